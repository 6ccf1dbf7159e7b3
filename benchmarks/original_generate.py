"""Baseline: time the original dalle-mini 0.1.5 `DalleBart.generate` (random weights, mini config).

Runs in the separate baseline environment (NOT the app's venv), see benchmarks/README.md:

    ../baseline-venv/bin/python benchmarks/original_generate.py --images 1 9 [--dtype float32]

The model is built from tests/fixtures/specs/dalle_mini_config.json with random weights
(`init_weights`), prompts are synthetic token ids (12 tokens + padding to 64), and generation
runs as the inference notebook does: super-conditioning 10, top-k 50 (the config default),
jit-compiled, on one device. Compilation is done ahead (`lower(...).compile()`) and reported
apart as compile_s; the figure reported is the best of --repeats calls of the compiled program
(gen_cpu_s: the process's CPU seconds, steadier on a shared machine). Last stdout line: JSON
{results: {images: {gen_s, gen_cpu_s, compile_s}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from dalle_mini import DalleBart
from dalle_mini.model.configuration import DalleBartConfig

SPECS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "specs"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def text_inputs(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.ones((batch, length), np.int32)  # <pad> = 1
    mask = np.zeros((batch, length), np.int32)
    ids[:, 0], ids[:, 13] = 0, 2  # <s> ... </s>
    ids[:, 1:13] = rng.integers(5, vocab, (batch, 12))
    mask[:, :14] = 1
    uncond = np.ones((batch, length), np.int32)
    uncond[:, 0], uncond[:, 1] = 0, 2
    uncond_mask = np.zeros((batch, length), np.int32)
    uncond_mask[:, :2] = 1
    return {"input_ids": ids, "attention_mask": mask, "input_ids_uncond": uncond,
            "attention_mask_uncond": uncond_mask}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, nargs="+", default=[1, 9])
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    dtype = getattr(jnp, args.dtype)

    values = json.loads((SPECS / "dalle_mini_config.json").read_text())
    config = DalleBartConfig(**values)
    t = time.perf_counter()
    model = DalleBart(config, dtype=dtype, _do_init=False)
    params = model.init_weights(jax.random.PRNGKey(0), (1, 1))
    jax.block_until_ready(params)
    log(f"jax {jax.__version__}, random mini params in {time.perf_counter() - t:.1f}s")

    def generate(inputs, key, params):
        return model.generate(**inputs, prng_key=key, params=params, top_k=50, condition_scale=10.0).sequences

    p_generate = jax.jit(generate)
    results = {}
    for n in args.images:
        inputs = {k: jnp.asarray(v) for k, v in text_inputs(n, config.max_text_length, config.encoder_vocab_size).items()}
        t = time.perf_counter()
        compiled = p_generate.lower(inputs, jax.random.PRNGKey(0), params).compile()
        compile_s = time.perf_counter() - t
        times, cpu_times = [], []
        for r in range(max(args.repeats, 1)):
            t, cpu = time.perf_counter(), time.process_time()
            codes = compiled(inputs, jax.random.PRNGKey(r + 1), params).block_until_ready()
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - cpu)
        assert codes.shape == (n, config.image_length + 1)
        results[n] = {"gen_s": round(min(times), 2), "gen_cpu_s": round(min(cpu_times), 2),
                      "compile_s": round(compile_s, 2)}
        log(f"{n} image(s): generate {min(times):.2f}s (compile {compile_s:.2f}s)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"implementation": "dalle-mini 0.1.5", "jax": jax.__version__, "dtype": args.dtype,
                      "results": results, "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
