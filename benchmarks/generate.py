"""Time text → codes (→ images → CLIP scores) at the published sizes, with random weights.

Builds DALL·E Mini or Mega from the real config (tests/fixtures/specs/dalle_{mini,mega}_config.json)
with random weights made leaf by leaf directly in the compute dtype (no download; peak memory
stays near one copy of the weights), plus, on request, the real-size VQGAN and CLIP ViT-B/32,
and runs the app's DallePipeline on one prompt. Compilation is timed separately (a warm-up
call); the reported times are the best of --repeats calls.

    JAX_PLATFORMS=cpu python benchmarks/generate.py --size mini --images 9 --dtype float32 --decode
    python benchmarks/generate.py --size mega --images 1 9 16 32 64 --dtype bfloat16   # one loop size each

Several image counts share one set of weights; each is compiled and timed as its own loop size
and printed as its own JSON line. Compilation is not cached between runs unless --cache-dir names
a folder: the same command run twice with it shows what a restart of the app costs.

Progress goes to stderr; each image count's stdout line is one JSON object:
images, gen_s (encode + sampling; gen_cpu_s: the process's CPU seconds for it, a steadier
figure on a shared machine), encode_s, decode_s (--decode), clip_s (--clip), total_s,
compile_s, tokens_per_s (codes sampled per second), peak_rss_mb (whole run), weights_mb,
init_peak_rss_mb (peak right after making the weights), images_per_s, and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import string
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_app import runtime  # noqa: E402
from dalle_app.models import weights  # noqa: E402
from dalle_app.models.dallebart import DalleBart, DalleBartConfig, DalleBartModel, abstract_params  # noqa: E402
from dalle_app.pipeline import DallePipeline  # noqa: E402
from dalle_app.text import TextProcessor, load_tokenizer  # noqa: E402

SPECS = ROOT / "tests" / "fixtures" / "specs"
TOKENIZER = ROOT / "tests" / "fixtures" / "reference" / "dallebart_tiny_a"  # any BART BPE will do
PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset, seagulls flying"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_leaf(shape: tuple[int, ...], dtype: jnp.dtype, std: float, kind: str,
                rng: np.random.Generator) -> jax.Array:
    """One parameter, made directly in its final dtype: norm scales 1, biases 0, the rest
    uniform noise of standard deviation `std` (the values do not matter for timing).

    On an accelerator it is drawn there; on CPU it is filled on the host a slice at a time
    (small float32 temporaries), so peak memory stays near one copy of the weights.
    """
    if kind == "scale" or not shape:  # norm scales (and scalars such as CLIP's logit_scale)
        return jnp.ones(shape, dtype)
    if kind == "bias":
        return jnp.zeros(shape, dtype)
    half_width = std * np.sqrt(3.0)
    if jax.default_backend() != "cpu":
        key = jax.random.PRNGKey(int(rng.integers(2**31)))
        return jax.random.uniform(key, shape, jnp.float32, -half_width, half_width).astype(dtype)
    host = np.empty(shape, np.dtype(dtype))
    for i in range(shape[0]):  # a layer (or a row block) at a time
        block = rng.random(shape[1:], np.float32)
        block *= 2 * half_width
        block -= half_width
        host[i] = block.astype(host.dtype)
    leaf = jnp.asarray(host)
    del host
    return leaf


def random_dallebart(config: DalleBartConfig, dtype: jnp.dtype, seed: int = 0) -> DalleBartModel:
    rng = np.random.default_rng(seed)
    flat = {}
    for path, spec in sorted(abstract_params(config, dtype).items()):
        kind = path.rsplit("/", 1)[-1]
        flat[path] = random_leaf(tuple(spec.shape), dtype, config.init_std, kind, rng)
    return DalleBartModel(config, DalleBart(config, dtype), weights.unflatten(flat))


def random_vqgan(dtype: jnp.dtype):
    from dalle_app.models.vqgan import VQGAN, VQGANConfig, build_vqgan, param_shapes

    config = VQGANConfig.from_dict(json.loads((SPECS / "vqgan_imagenet_f16_16384.spec.json").read_text())["config"])
    rng = np.random.default_rng(1)
    flat = {}
    for path, shape in param_shapes(config).items():
        kind = path.rsplit("/", 1)[-1]
        fan_in = int(np.prod(shape[:-1])) if kind == "kernel" else 1
        flat[path] = random_leaf(tuple(shape), jnp.float32, 1 / np.sqrt(fan_in), kind, rng)
    return VQGAN(config, build_vqgan(config, dtype), weights.unflatten(flat))


def random_clip(dtype: jnp.dtype):
    """CLIP ViT-B/32 with random weights and a letters-only tokenizer (ids are all that matter)."""
    from transformers import CLIPTokenizer

    from dalle_app.models.clip import CLIP, CLIPConfig, build_clip, param_shapes
    from dalle_app.models.clip_preprocess import CLIPImagePreprocessor, CLIPTextTokenizer

    config = CLIPConfig.from_dict(json.loads((SPECS / "clip_vit_base_patch32.safetensors.spec.json").read_text())["config"])
    rng = np.random.default_rng(2)
    flat = {}
    for path, shape in param_shapes(config).items():
        kind = path.rsplit("/", 1)[-1]
        flat[path] = random_leaf(tuple(shape), dtype, 0.02, kind, rng)
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    tokenizer = CLIPTextTokenizer(CLIPTokenizer(vocab=vocab, merges=[]), config.text.max_position_embeddings)
    return CLIP(config, build_clip(config, dtype), weights.unflatten(flat),
                CLIPImagePreprocessor.for_image_size(config.vision.image_size), tokenizer)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["mini", "mega"], default="mini")
    parser.add_argument("--images", type=int, nargs="+", default=[9],
                        help="images per decoding loop; several values time several loop sizes")
    parser.add_argument("--dtype", choices=sorted(runtime.DTYPES), default=None,
                        help="compute dtype (default: the backend's default)")
    parser.add_argument("--decode", action="store_true", help="also decode the images with the VQGAN")
    parser.add_argument("--clip", action="store_true", help="also score them with CLIP ViT-B/32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--cond-scale", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=None,
                        help="decode only this many of the 256 positions (slow CPU runs of mega); "
                             "the JSON then also gives step_s, the time per step")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the encoder/decoder layer count (quick smoke runs only)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="persistent compilation cache (default: none, to time real compilation)")
    args = parser.parse_args()
    args.decode = args.decode or args.clip  # CLIP scores decoded images
    if args.steps is not None and args.decode:
        parser.error("--steps times part of the sampling only: leave out --decode/--clip")

    runtime.configure(cache_dir=args.cache_dir or False)
    dtype = runtime.resolve_dtype(args.dtype)
    values = json.loads((SPECS / f"dalle_{args.size}_config.json").read_text())
    if args.layers:
        values.update(encoder_layers=args.layers, decoder_layers=args.layers)
    config = DalleBartConfig.from_dict(values)
    log(f"backend {jax.default_backend()} ({len(jax.local_devices())} device(s)), {args.size}, "
        f"{runtime.dtype_name(dtype)}, {' / '.join(map(str, args.images))} image(s)")
    t = time.perf_counter()
    dalle = random_dallebart(config, dtype)
    jax.block_until_ready(dalle.params)
    weights_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(dalle.params)) / 2**20
    init_rss_mb = peak_rss_mb()
    log(f"random DalleBart ({weights_mb:.0f} MB) made in {time.perf_counter() - t:.1f}s, "
        f"peak RSS {init_rss_mb:.0f} MB")
    text = TextProcessor(load_tokenizer(TOKENIZER, config.max_text_length), config.max_text_length, None)
    vqgan = random_vqgan(jnp.float32)
    clip = random_clip(jnp.float32) if args.clip else None
    pipe = DallePipeline(dalle, text, vqgan, clip, batch_buckets=tuple(sorted(set(args.images))))
    for n in args.images:
        result = time_images(args, pipe, n, config.image_length)
        result.update(weights_mb=round(weights_mb), init_peak_rss_mb=round(init_rss_mb))
        print(json.dumps(result), flush=True)
        pipe.step_s[n] = result["step_s"]
    if len(pipe.step_s) > 1:  # what the app's scheduler would choose from these step times
        print(json.dumps({"loop_images": pipe.loop_images(), "step_s": pipe.step_s}), flush=True)


def time_images(args: argparse.Namespace, pipe: DallePipeline, n: int, image_length: int) -> dict:
    """Compile (warm-up) and time `--repeats` calls for one loop of `n` images; the result line."""
    steps = args.steps or image_length
    t = time.perf_counter()
    pipe.generate_codes(pipe_rows(args, n), steps=0)
    compile_s = time.perf_counter() - t
    if args.decode:
        t = time.perf_counter()
        pipe.decode_images(np.zeros((n, image_length), np.int32))
        compile_s += time.perf_counter() - t
    if pipe.clip is not None:
        images = pipe.decode_images(np.zeros((1, image_length), np.int32))
        t = time.perf_counter()
        pipe.score(PROMPT, images * n)
        compile_s += time.perf_counter() - t
    log(f"{n} image(s): compiled in {compile_s:.1f}s (warm-up, includes one decode/score run)")

    runs = []
    for r in range(args.repeats):
        cpu = time.process_time()
        codes, timings = pipe.generate_codes(pipe_rows(args, n), steps=args.steps)
        timings["gen_cpu_s"] = time.process_time() - cpu
        if args.decode:
            t = time.perf_counter()
            images = pipe.decode_images(codes)
            timings["decode_s"] = time.perf_counter() - t
            if pipe.clip is not None:
                t = time.perf_counter()
                pipe.score(PROMPT, images)
                timings["clip_s"] = time.perf_counter() - t
        timings["gen_s"] = timings["encode_s"] + timings["generate_s"]
        runs.append(timings)
        log(f"{n} image(s), run {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    best = {k: min(run[k] for run in runs) for k in runs[0]}
    total_s = sum(best.get(k, 0.0) for k in ("gen_s", "decode_s", "clip_s"))
    return {
        "size": args.size, "dtype": runtime.dtype_name(pipe.dalle.dtype), "backend": jax.default_backend(),
        "device": jax.local_devices()[0].device_kind, "images": n, "layers": pipe.dalle.config.decoder_layers,
        "repeats": args.repeats, **{k: round(v, 3) for k, v in best.items()},
        "total_s": round(total_s, 3),
        "compile_s": round(compile_s, 2),
        "cache_dir": None if args.cache_dir is None else str(args.cache_dir),
        "steps": steps,
        "step_s": round(best["generate_s"] / steps, 5),
        "tokens_per_s": round(n * steps / best["gen_s"], 1),
        "images_per_s": round(n / total_s, 2) if steps == image_length else None,
        "peak_rss_mb": round(peak_rss_mb()),
    }


def pipe_rows(args: argparse.Namespace, n: int) -> list:
    from dalle_app.pipeline import image_rows
    from dalle_app.request import GenerationRequest, SamplingSettings

    sampling = SamplingSettings(top_k=args.top_k, cond_scale=args.cond_scale)
    return image_rows(GenerationRequest(PROMPT, num_images=n, seed=0, sampling=sampling))


if __name__ == "__main__":
    main()
