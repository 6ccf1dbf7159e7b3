"""Peak host memory of loading a DALL·E Mega-sized DalleBart checkpoint.

Writes a checkpoint with the published mega config and random weights (float16 by default:
5.2 GB) in flax's msgpack format, streaming one tensor at a time, then loads it with
`load_dallebart` in a fresh process and reads that process's peak RSS (VmHWM). Prints JSON
{weights_gb, peak_rss_gb, baseline_rss_gb, ratio, ratio_above_baseline, load_s}: ratio = peak
RSS / bytes of weights in the file; ratio_above_baseline leaves out what the process held before
loading (Python, jax, flax). A
loader that held the file's arrays and the cast/stacked copy at once would show a ratio near 2.

    python benchmarks/load_memory.py                       # scanned fp16 file, fp16 compute
    python benchmarks/load_memory.py --unscanned           # FlaxBartEncoderLayer_{i} layout
    python benchmarks/load_memory.py --config tests/fixtures/specs/dalle_mini_config.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEGA_CONFIG = ROOT / "tests" / "fixtures" / "specs" / "dalle_mega_config.json"


def _leaves(config_values: dict, unscanned: bool) -> dict[str, tuple[int, ...]]:
    from dalle_app.models.dallebart import DalleBartConfig, abstract_params, scanned_layer_shapes

    shapes = {k: tuple(v.shape) for k, v in abstract_params(DalleBartConfig.from_dict(config_values)).items()}
    return shapes if unscanned else scanned_layer_shapes(shapes)


def write_checkpoint(folder: Path, config_values: dict, dtype: str, unscanned: bool) -> int:
    """Stream a flax-msgpack checkpoint of random weights; returns the bytes of weights written."""
    shapes = _leaves(config_values, unscanned)
    tree: dict = {}
    for path, shape in shapes.items():  # nested dict of shapes, to write map headers in order
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = shape
    rng = np.random.default_rng(0)
    packer = msgpack.Packer()
    total = 0

    def write(node: dict, f) -> None:
        nonlocal total
        f.write(packer.pack_map_header(len(node)))
        for key, value in node.items():
            f.write(packer.pack(key))
            if isinstance(value, dict):
                write(value, f)
                continue
            arr = (0.02 * rng.standard_normal(value, dtype=np.float32)).astype(dtype)
            total += arr.nbytes
            payload = msgpack.packb((list(arr.shape), arr.dtype.name, arr.tobytes()))
            del arr
            f.write(packer.pack(msgpack.ExtType(1, payload)))  # flax.serialization's ndarray ext

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config_values, "use_scan": not unscanned}))
    with open(folder / "flax_model.msgpack", "wb") as f:
        write(tree, f)
    return total


# Peak RSS is read from VmHWM, the high-water mark of this process image: unlike ru_maxrss it is
# not inherited from the (larger) parent through fork + exec.
CHILD = """
import json, sys, time
import jax.numpy as jnp
from dalle_app.models.dallebart import load_dallebart
def peak_kb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])
base = peak_kb()
t = time.perf_counter()
model = load_dallebart(sys.argv[1], dtype=jnp.dtype(sys.argv[2]))
leaves = __import__("jax").tree_util.tree_leaves(model.params)
__import__("jax").block_until_ready(leaves)
print(json.dumps({"baseline_kb": base, "peak_kb": peak_kb(),
                  "load_s": time.perf_counter() - t, "param_bytes": sum(x.nbytes for x in leaves)}))
"""


def measure(folder: Path, compute: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), compute], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=MEGA_CONFIG)
    ap.add_argument("--stored", default="float16", choices=["float16", "float32", "bfloat16"])
    ap.add_argument("--compute", default=None, help="compute dtype (default: the stored dtype)")
    ap.add_argument("--unscanned", action="store_true", help="write FlaxBart*Layer_{i} (the module's own layout)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where to write and keep the checkpoint, reused if already there "
                         "(default: a temp dir, deleted)")
    args = ap.parse_args()
    if args.stored == "bfloat16":
        import ml_dtypes  # noqa: F401  (numpy's bfloat16)

    folder = args.dir or Path(tempfile.mkdtemp(prefix="dallebart_mem_"))
    config_values = json.loads(args.config.read_text())
    try:
        t = time.perf_counter()
        if (folder / "flax_model.msgpack").is_file():  # a kept --dir from an earlier run
            shapes = _leaves(config_values, args.unscanned)
            written = sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(args.stored).itemsize
        else:
            written = write_checkpoint(folder, config_values, args.stored, args.unscanned)
        write_s = time.perf_counter() - t
        result = measure(folder, args.compute or args.stored)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    gb = 1e9
    print(json.dumps({
        "config": args.config.name, "stored": args.stored, "compute": args.compute or args.stored,
        "layout": "unscanned" if args.unscanned else "scanned",
        "weights_gb": round(written / gb, 3), "loaded_params_gb": round(result["param_bytes"] / gb, 3),
        "baseline_rss_gb": round(result["baseline_kb"] * 1024 / gb, 3),
        "peak_rss_gb": round(result["peak_kb"] * 1024 / gb, 3),
        "ratio": round(result["peak_kb"] * 1024 / written, 3),
        "ratio_above_baseline": round((result["peak_kb"] - result["baseline_kb"]) * 1024 / written, 3),
        "load_s": round(result["load_s"], 1), "write_s": round(write_s, 1),
    }))


if __name__ == "__main__":
    main()
