"""Fine-tune the VQGAN's decoder alone (`post_quant_conv` + `decoder`), encoder and codebook frozen.

The decoder learns to draw the codes DalleBart is trained on: the encoder's codes made one per
color of an image (`color_consistent_codes`). Codes never change, so a DalleBart trained on them
stays valid, while they decode to sharper images. It runs after DalleBart, with the time left.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dalle_app.hardware import compiler_options
from dalle_app.models.vqgan import VQModel, load_vqgan, save_vqgan
from dalle_app.train.codes import code_encoder
from dalle_app.train.common import (
    OptimConfig,
    PhaseLog,
    Prefetcher,
    make_optimizer,
    remaining,
    run_loop,
    start_state,
    write_json,
)
from dalle_app.train.vqgan_training import VQGANTrainConfig, evaluate, images_for_step, reconstruction_losses

PHASE = "vqgan-decoder"
TRAINED = ("decoder", "post_quant_conv")


def make_train_step(module: VQModel, tx: optax.GradientTransformation, cfg: VQGANTrainConfig):
    """Jitted (decoder params, opt_state, frozen params, images, their codes) → (decoder params,
    opt_state, metrics)."""

    def loss_fn(trained: Any, frozen: Any, x: jax.Array, codes: jax.Array):
        y = module.apply({"params": {**frozen, **trained}}, codes, method=VQModel.decode_codes)
        rec = reconstruction_losses(x, y, cfg.object_weight)
        loss = rec["l1"] + cfg.l2_weight * rec["l2"] + cfg.gradient_weight * rec["grad_l1"]
        return loss, {"loss": loss, **rec}

    @partial(jax.jit, compiler_options=compiler_options())
    def step(trained: Any, opt_state: Any, frozen: Any, x: jax.Array, codes: jax.Array):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained, frozen, x, codes)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, metrics

    return step


def finetune_decoder(out: Path, cfg: VQGANTrainConfig, seed: int = 0, deadline: float | None = None,
                     workers: int = 0) -> dict[str, Any]:
    """Fine-tune `out/vqgan/model`'s decoder; exports the whole VQGAN to `out/vqgan-decoder/model/`."""
    folder = out / PHASE
    log = PhaseLog(folder, PHASE)
    t0 = time.time()
    vq = load_vqgan(out / "vqgan" / "model")
    frozen = {k: v for k, v in vq.params.items() if k not in TRAINED}
    trained = {k: v for k, v in vq.params.items() if k in TRAINED}
    before = evaluate(vq.module, vq.params, seed, cfg.eval_images)
    optim = OptimConfig(cfg.lr, cfg.warmup)
    tx = make_optimizer(optim)
    state = start_state(folder, log, trained, tx, cfg.steps, cfg.seconds)
    train_step = make_train_step(vq.module, tx, cfg)
    images = Prefetcher(partial(images_for_step, seed + 1, n=cfg.batch_size), workers)
    codes_of = code_encoder(vq.module)

    def step_fn(st: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        x = images(step)
        st["params"], st["opt_state"], metrics = train_step(st["params"], st["opt_state"], frozen,
                                                             jnp.asarray(x), jnp.asarray(codes_of(vq.params, x)))
        return st, metrics

    def export(st: dict[str, Any]) -> None:
        save_vqgan(folder / "model", vq.config, {**frozen, **st["params"]})

    with images:
        state = run_loop(folder, log, state, step_fn, optim, cfg.save_every, cfg.log_every,
                         remaining(cfg.seconds, t0), deadline, export)
    after = evaluate(vq.module, {**frozen, **state["params"]}, seed, cfg.eval_images)
    report = {"steps": int(state["step"]), "total_steps": int(state["total_steps"]), "batch_size": cfg.batch_size,
              "train_seconds": round(time.time() - t0, 1),
              **{f"before_{k}": v for k, v in before.items()}, **after}
    log(int(state["step"]), **report)
    write_json(folder / "report.json", report)
    return report
