"""Ours against the original dalle-mini 0.1.5 on this CPU, in one run, one program after the other.

    python benchmarks/compare_cpu.py --baseline-python ../baseline-venv/bin/python --images 1 9

For each image count it runs `generate.py --size mini --images N --dtype float32 --decode` (ours:
sampling + VQGAN decode) and then `original_generate.py --images N` in the original's own
environment (its `DalleBart.generate` alone: no VQGAN), each in a fresh process with compilation
timed apart, and prints one table: the two times and their ratio (the original's generation over
our generation + decode). Before the table: the CPU model, core count, AVX-512 or not, the load
average before and after (a shared machine makes every figure meaningless), and the date. The
last stdout line is the same as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_facts() -> dict[str, object]:
    """What the figures depend on: CPU model, cores, AVX-512, and the machine's load right now."""
    model, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "avx512": "avx512f" in flags.split(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def last_json(command: list[str], env: dict[str, str]) -> dict:
    """Run a benchmark script; its last stdout line is a JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-python", required=True,
                        help="the Python of the original's environment (benchmarks/README.md)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 9])
    args = parser.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    before = cpu_facts()
    rows = []
    for n in args.images:
        ours = last_json([sys.executable, str(HERE / "generate.py"), "--size", "mini", "--images", str(n),
                          "--dtype", "float32", "--decode"], env)
        original = last_json([args.baseline_python, str(HERE / "original_generate.py"), "--images", str(n)],
                             env)["results"][str(n)]
        total = ours["gen_s"] + ours["decode_s"]
        rows.append({"images": n, "ours_gen_s": ours["gen_s"], "ours_decode_s": ours["decode_s"],
                     "ours_total_s": round(total, 2), "ours_compile_s": ours["compile_s"],
                     "original_gen_s": original["gen_s"], "original_compile_s": original["compile_s"],
                     "ratio": round(original["gen_s"] / total, 2)})
    facts = {**before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
             "date": datetime.date.today().isoformat()}
    print(f"{facts['cpu']}, {facts['cores']} cores, AVX-512: {'yes' if facts['avx512'] else 'no'}; "
          f"load average {facts['load_average']} before, {facts['load_average_after']} after; {facts['date']}")
    print("| images | ours: generation + decode | original: generation | original / ours |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['ours_gen_s']:.1f} + {r['ours_decode_s']:.1f} = {r['ours_total_s']:.1f} s "
              f"| {r['original_gen_s']:.1f} s | {r['ratio']:.2f}x |")
    print(json.dumps({**facts, "results": rows}))


if __name__ == "__main__":
    main()
