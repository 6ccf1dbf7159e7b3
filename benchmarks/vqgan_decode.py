"""Time the VQGAN decode at the published size (16x16 codes → 256x256x3) on this machine.

Builds `dalle-mini/vqgan_imagenet_f16_16384`'s config (from tests/fixtures/specs) with random
weights, jit-compiles the decode and times batches of 1 and 9 images (best of --repeats runs,
compile excluded). The last line printed is JSON: {s_per_image_1, s_per_image_9, compile_s, ...};
`cpu_s_per_image_*` (process CPU time of the best run) and `load_avg_1min` help read figures
taken while other processes share the CPU: wall time then grows, CPU time much less.

    JAX_PLATFORMS=cpu python benchmarks/vqgan_decode.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_app.models.vqgan import VQGAN, VQGANConfig, build_vqgan, param_shapes  # noqa: E402
from dalle_app.models.weights import unflatten  # noqa: E402

SPEC = ROOT / "tests" / "fixtures" / "specs" / "vqgan_imagenet_f16_16384.spec.json"


def random_params(config: VQGANConfig, seed: int = 0) -> dict:
    """Fan-in-scaled random weights (fast to make; keeps activations at a realistic scale)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(config).items():
        leaf = path.rsplit("/", 1)[1]
        if leaf == "scale":
            flat[path] = np.ones(shape, np.float32)
        elif leaf == "bias":
            flat[path] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[:-1])) if leaf == "kernel" else 1
            flat[path] = (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(np.float32)
    return jax.tree_util.tree_map(jax.numpy.asarray, unflatten(flat))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` runs."""
    runs = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        jax.block_until_ready(fn())
        runs.append((time.perf_counter() - t0, _cpu_seconds() - c0))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = VQGANConfig.from_dict(json.loads(SPEC.read_text())["config"])
    vq = VQGAN(config, build_vqgan(config), random_params(config))
    rng = np.random.default_rng(1)
    result: dict[str, float | str] = {"device": jax.devices()[0].device_kind,
                                      "load_avg_1min": round(os.getloadavg()[0], 2)}
    for batch in (1, 9):
        codes = rng.integers(0, config.n_embed, (batch, config.num_codes), dtype=np.int32)
        t0 = time.perf_counter()
        jax.block_until_ready(vq.decode(codes))
        first = time.perf_counter() - t0
        seconds, cpu_seconds = best_time(lambda: vq.decode(codes), args.repeats)
        result[f"s_per_image_{batch}"] = round(seconds / batch, 4)
        result[f"cpu_s_per_image_{batch}"] = round(cpu_seconds / batch, 4)
        if batch == 1:
            result["compile_s"] = round(first - seconds, 3)
        print(f"batch {batch}: first call {first:.2f} s, best of {args.repeats} {seconds:.3f} s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
