"""This CPU's floors for a decoding step, beside what XLA reaches on the same products.

    JAX_PLATFORMS=cpu python benchmarks/cpu_floor.py

A step of the sampler multiplies R rows (2 per image: conditional and unconditional) by every
decoder weight matrix once, so on CPU it is bound by how fast the weights stream from memory.
This prints, in GB/s of weights read (best of several calls, 12 different matrices per call so
that nothing stays in cache):
- `numpy_read`: numpy summing a 1 GiB array (one thread's streaming read rate);
- `openblas`: numpy's BLAS multiplying R rows by the decoder's two matrix shapes;
- `xla_default` / `xla_no_ynn`: the same products in one jitted program, with XLA's default dot
  (YNNPACK fusion) and with `xla_cpu_experimental_ynn_fusion_type=""` (what the sampler uses for
  loops of two images or more);
- `xla_bf16`: the same with bfloat16 weights and rows, accumulated in float32, XLA's default
  dot (GB/s of float32-equivalent weights, so it compares with the others as a speed).
The last stdout line is JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_cpu import cpu_facts  # noqa: E402

SHAPES = ((1024, 2730), (2730, 1024), (1024, 1024))  # DALL·E Mini decoder: GLU in/out, attention
MATRICES = 12


def best(call, repeats: int = 15) -> float:
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    results: dict[str, object] = {"cpu": cpu_facts()}
    big = np.ones(2**28, np.float32)
    results["numpy_read"] = round(big.nbytes / best(big.sum, 5) / 1e9, 2)
    del big
    rng = np.random.default_rng(0)
    for rows in (2, 18):
        for k, n in SHAPES:
            weights = [rng.random((k, n), np.float32) for _ in range(MATRICES)]
            x = rng.random((rows, k), np.float32)
            nbytes = MATRICES * k * n * 4
            key = f"{rows}x{k}x{n}"
            results[f"openblas {key}"] = round(nbytes / best(lambda: [x @ w for w in weights]) / 1e9, 2)
            on_device = [jnp.asarray(w) for w in weights]
            xj = jnp.asarray(x)
            for name, options in (("xla_default", None), ("xla_no_ynn", {"xla_cpu_experimental_ynn_fusion_type": ""})):
                f = jax.jit(lambda x, ws: [x @ w for w in ws], compiler_options=options)
                seconds = best(lambda: jax.block_until_ready(f(xj, on_device)))
                results[f"{name} {key}"] = round(nbytes / seconds / 1e9, 2)
            halves = [w.astype(jnp.bfloat16) for w in on_device]
            f = jax.jit(lambda x, ws: [jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
                                       for w in ws])
            seconds = best(lambda: jax.block_until_ready(f(xj, halves)))
            results[f"xla_bf16 {key}"] = round(nbytes / seconds / 1e9, 2)
    for key, value in results.items():
        print(f"{key}: {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
