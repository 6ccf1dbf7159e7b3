"""Seconds per training step of each model, compiled with the sampler's CPU options and with XLA's own.

    JAX_PLATFORMS=cpu python benchmarks/train_steps.py [--repeats 3] [--steps 10]

The `cpu` training profile's sizes (`dalle_app/train/profiles.py`): the VQGAN (8 images and their
8 cell mosaics), CLIP (96 images, 96 near misses, 8 analogy quadruples and 192 captions) and
DalleBart (32 captions × 256 codes; the outline fine-tunes run the same step), on rendered
scenes and freshly initialised weights. Each step function is jitted twice:
- `sampler_options`: `hardware.CPU_COMPILER_OPTIONS`, XLA's YNNPACK dot fusion switched off,
  which the sampler needs for its few-row products;
- `xla_default`: XLA's own options, the fusion on.

They alternate, `--repeats` times each, and each time is the mean of `--steps` steps after a
warm-up step; the best of the repeats is printed. Which one each trainer compiles its step with,
and why: `hardware.CPU_COMPILER_OPTIONS`.
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compare_cpu import cpu_facts  # noqa: E402

from dalle_app.hardware import CPU_COMPILER_OPTIONS  # noqa: E402
from dalle_app.hub import EMBEDDED_FOLDERS  # noqa: E402
from dalle_app.models.clip_preprocess import CLIPImagePreprocessor, load_clip_tokenizer  # noqa: E402
from dalle_app.models.dallebart import DalleBart  # noqa: E402
from dalle_app.models.vqgan import build_vqgan  # noqa: E402
from dalle_app.train import clip_training, dallebart_training, vqgan_training  # noqa: E402
from dalle_app.train.common import OptimConfig, make_optimizer  # noqa: E402
from dalle_app.train.profiles import PROFILES  # noqa: E402

def vqgan_case():
    cfg, model = PROFILES["cpu"].vqgan, PROFILES["cpu"].vqgan_model
    module = build_vqgan(model)
    x = jnp.asarray(vqgan_training.images_for_step(0, 0, n=cfg.batch_size))
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    order = jnp.asarray(np.random.default_rng(0).permutation(model.latent_size ** 2))
    tx = make_optimizer(OptimConfig(cfg.lr, cfg.warmup))
    return vqgan_training.make_train_step(module, tx, cfg), (params, tx.init(params), x, order)


def clip_case():
    cfg = PROFILES["cpu"].clip
    folder = EMBEDDED_FOLDERS["clip"]
    config = clip_training.model_config(load_clip_tokenizer(folder).vocab_size, 64, cfg.width, cfg.layers)
    tokenizer = load_clip_tokenizer(folder, config.text.max_position_embeddings)
    module = clip_training.build_clip(config)
    params = clip_training.init_params(module, jax.random.PRNGKey(0))
    batch = clip_training.model_inputs(clip_training.render_batch(0, 0, cfg.batch_size, "train", cfg.analogies),
                                       CLIPImagePreprocessor.for_image_size(64), tokenizer)
    tx = make_optimizer(OptimConfig(cfg.lr, cfg.warmup, cfg.weight_decay))
    return clip_training.make_train_step(module, tx, cfg.analogy_weight), (params, tx.init(params), batch)


def dallebart_case():
    profile = PROFILES["cpu"]
    cfg = profile.dallebart
    config = dallebart_training.model_config(profile.vqgan_model, profile.tokenizer_vocab_size, profile.max_text_length,
                                             cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.heads,
                                             cfg.activation)
    module = DalleBart(config)
    text = jnp.ones((1, config.max_text_length), jnp.int32)
    params = module.init(jax.random.PRNGKey(0), text, text, jnp.ones((1, config.image_length), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, config.encoder_vocab_size, (cfg.batch_size, config.max_text_length)), jnp.int32),
             "attention_mask": jnp.ones((cfg.batch_size, config.max_text_length), jnp.int32),
             "codes": jnp.asarray(rng.integers(0, config.image_vocab_size, (cfg.batch_size, config.image_length)), jnp.int32)}
    tx = make_optimizer(OptimConfig(cfg.lr, cfg.warmup, cfg.weight_decay))
    return dallebart_training.make_train_step(module, tx), (params, tx.init(params), batch)


def seconds_per_step(step, args: tuple, steps: int) -> float:
    out = step(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = step(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name, case in (("vqgan", vqgan_case), ("clip", clip_case), ("dallebart", dallebart_case)):
        step, inputs = case()
        fn = step.__wrapped__  # the trainer's step function, before its jit
        compiled = {"sampler_options": jax.jit(fn, compiler_options=dict(CPU_COMPILER_OPTIONS)),
                    "xla_default": jax.jit(fn)}
        times: dict[str, list[float]] = {k: [] for k in compiled}
        for _ in range(args.repeats):
            for option, jitted in compiled.items():
                times[option].append(seconds_per_step(jitted, inputs, args.steps))
        best = results[name] = {k: round(min(v), 3) for k, v in times.items()}
        print(f"{name:10s} sampler options {best['sampler_options']:.3f} s/step   XLA default "
              f"{best['xla_default']:.3f} s/step", flush=True)
    print(json.dumps({"seconds_per_step": results, **cpu_facts()}))


if __name__ == "__main__":
    main()
