"""VQGAN training: reconstruction (L1 + L2 + an image-gradient L1 for sharp edges), codebook and
commitment losses, with a codebook that is actually used.

No perceptual or adversarial loss: the scenes are flat shapes on light backgrounds, where pixel
losses already give clean reconstructions. The codebook is (1) initialised from encoder outputs
of real images after a few steps (random init would leave most codes far from the data), then
(2) every `restart_every` steps, codes no image picked since the last restart are moved onto
random encoder outputs ("dead-code restarts"), and (3) at the same steps an object colour whose
cells mostly sit on codes another colour owns gets a code of its own, moved onto the mean
encoder output of its cells: without it a run could end with green and cyan sharing codes, and
DalleBart, trained on those codes, drew one for the other. Usage, perplexity and colour purity
(`color_purity`) are logged and reported.

Codes are made *local*: each step also encodes the batch with its cells shuffled (a mosaic of the
same cells), and a locality loss asks every cell's vector to be the same in both. Without it the
encoder, which sees its neighbours, spent codes on context: a plain background of one tint came
out as ~17 different codes per image, depending on where the border and the objects were, and
95% of DalleBart's loss went to guessing those variants. With local codes a cell's code is a
function of its own color, and DalleBart's decisions are only where to paint which color.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_app.data import batch as data_batch
from dalle_app.data.world import COLORS
from dalle_app.hardware import compiler_options
from dalle_app.models.vqgan import VQGANConfig, VQModel, build_vqgan, init_params, save_vqgan
from dalle_app.train.codes import (
    code_consistency,
    code_owners,
    color_consistent_codes,
    color_purity,
    palette_cells,
)
from dalle_app.train.common import (
    OptimConfig,
    PhaseLog,
    Prefetcher,
    make_optimizer,
    phase_seed,
    run_loop,
    remaining,
    start_state,
    write_json,
)

PHASE = "vqgan"
PALETTE = np.array(list(COLORS.values()), np.float32)
OWN_SHARE = 0.9
"""An object colour with fewer of its cells than this on codes it owns gets a code of its own."""


def default_model_config() -> VQGANConfig:
    """f4 (64x64 → 16x16 = 256 codes, one per cell of the scenes' grid), sized for CPU training.

    64 codes: a cell is one flat object color or a background tint. Few codes alone did not keep
    the encoder from spending them on context; the locality loss (module docstring) does."""
    return VQGANConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=0, attn_resolutions=(), resolution=64,
        z_channels=32, n_embed=64, embed_dim=16,
    )


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig:
    steps: int | None = 1000  # None: as many as fit in `seconds`
    seconds: float | None = None
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    l2_weight: float = 1.0
    gradient_weight: float = 0.5
    object_weight: float = 4.0  # extra loss weight on object pixels (see object_weights)
    locality_weight: float = 1.0  # weight of the locality loss (module docstring); 0 turns it off
    commitment_weight: float = 0.25
    init_codebook_at: int = 20
    restart_every: int = 50
    restart_until: float = 0.8  # fraction of the run after which codes are left alone
    min_color_purity: float = 0.98  # below it the phase stops with an error (`color_purity`)
    save_every: int = 100
    log_every: int = 20
    eval_images: int = 256


def images_for_step(seed: int, step: int, n: int) -> np.ndarray:
    """Training images of one step as float32 in [0, 1] (DALL·E Mini's VQGAN input range)."""
    return data_batch(phase_seed(seed, PHASE, step), n, "train").images.astype(np.float32) / 255.0


def object_weights(x: jax.Array, extra: float, threshold: float = 0.1) -> jax.Array:
    """Per-pixel loss weights (B, H, W, 1): 1 on the background, 1 + `extra` on the objects.

    Objects are small (a few percent of the pixels) and the light background is most of the
    loss, so without this the model first learns backgrounds and blurry blobs. A pixel counts as
    object when some channel differs from the image's mean border color by more than `threshold`.
    """
    border = jnp.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    background = jnp.mean(border, axis=1)[:, None, None, :]
    is_object = jnp.max(jnp.abs(x - background), axis=-1, keepdims=True) > threshold
    return 1.0 + extra * is_object.astype(x.dtype)


def reconstruction_losses(x: jax.Array, y: jax.Array, object_weight: float = 0.0) -> dict[str, jax.Array]:
    """Object-weighted L1 and L2, and L1 of horizontal/vertical differences (edges), between input
    x and output y."""
    def grads(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        return a[:, 1:] - a[:, :-1], a[:, :, 1:] - a[:, :, :-1]

    w = object_weights(x, object_weight)
    w = w / jnp.mean(w)
    (xv, xh), (yv, yh) = grads(x), grads(y)
    return {
        "l1": jnp.mean(w * jnp.abs(y - x)),
        "l2": jnp.mean(w * (y - x) ** 2),
        "grad_l1": 0.5 * (jnp.mean(jnp.abs(yv - xv)) + jnp.mean(jnp.abs(yh - xh))),
    }


def shuffle_cells(x: jax.Array, order: jax.Array, side: int) -> jax.Array:
    """Images (B, H, W, C) cut into side x side cells (the code grid), rearranged so that cell j
    of the result is cell order[j] of the input (cells numbered row-major)."""
    b, h, w, c = x.shape
    gh, gw = h // side, w // side
    cells = x.reshape(b, gh, side, gw, side, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, side, side, c)
    cells = cells[:, order].reshape(b, gh, gw, side, side, c)
    return cells.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def locality_loss(latents: jax.Array, shuffled_latents: jax.Array, order: jax.Array) -> jax.Array:
    """Mean squared difference between each cell's vector in the image and in its mosaic."""
    b, gh, gw, d = latents.shape
    return jnp.mean((shuffled_latents.reshape(b, gh * gw, d) - latents.reshape(b, gh * gw, d)[:, order]) ** 2)


def make_train_step(module: VQModel, tx: optax.GradientTransformation, cfg: VQGANTrainConfig):
    """A jitted (params, opt_state, images, cell order) → (params, opt_state, metrics, code indices).

    With a locality weight, the images and their cell mosaics (`shuffle_cells` by `order`) are one
    batch: both are reconstructed, and their vectors are tied by `locality_loss`."""
    side = module.config.downsampling

    def loss_fn(params: Any, x: jax.Array, order: jax.Array):
        n = x.shape[0]
        if cfg.locality_weight:
            x = jnp.concatenate([x, shuffle_cells(x, order, side)])
        out = module.apply({"params": params}, x, train=True)
        rec = reconstruction_losses(x, out.reconstruction, cfg.object_weight)
        loss = (
            rec["l1"] + cfg.l2_weight * rec["l2"] + cfg.gradient_weight * rec["grad_l1"]
            + out.codebook_loss + cfg.commitment_weight * out.commitment_loss
        )
        metrics = {"loss": loss, **rec, "codebook": out.codebook_loss, "commitment": out.commitment_loss}
        if cfg.locality_weight:
            z = out.latents.astype(jnp.float32)
            metrics["locality"] = locality_loss(z[:n], z[n:], order)
            loss = loss + cfg.locality_weight * metrics["locality"]
            metrics["loss"] = loss
        return loss, (metrics, out.indices[:n])

    @partial(jax.jit, compiler_options=compiler_options())
    def step(params: Any, opt_state: Any, x: jax.Array, order: jax.Array):
        (_, (metrics, indices)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, order)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics, indices

    return step


def make_encoder(module: VQModel):
    """Jitted params, images → pre-quantization vectors (B*h*w, embed_dim) and codes (B, h*w)."""

    @jax.jit
    def encode(params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        z, _, indices = module.apply({"params": params}, x, method=VQModel.encode)
        return z.reshape(-1, z.shape[-1]), indices.reshape(indices.shape[0], -1)

    return encode


def replace_codes(params: Any, rows: np.ndarray, vectors: np.ndarray) -> Any:
    """Copy of params with codebook rows `rows` set to `vectors`."""
    table = np.array(params["quantize"]["embedding"]["embedding"])
    table[rows] = vectors
    quantize = {**params["quantize"], "embedding": {"embedding": jnp.asarray(table)}}
    return {**params, "quantize": quantize}


def codebook_usage(indices: np.ndarray, n_embed: int) -> dict[str, float]:
    """Share of codes used and the perplexity (exp of the code-usage entropy) over `indices`."""
    counts = np.bincount(indices.reshape(-1), minlength=n_embed).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


def evaluate(module: VQModel, params: Any, seed: int, n: int) -> dict[str, float]:
    """On `n` held-out-split images (never trained on): reconstruction error, codebook usage, code
    consistency (`code_consistency`) and the error of decoding the codes DalleBart is trained on
    (`eval_drawn_l1`, after `color_consistent_codes`)."""
    images = data_batch(phase_seed(seed, "vqgan-eval"), n, "validation").images.astype(np.float32) / 255.0
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x))
    decode = jax.jit(lambda p, c: module.apply({"params": p}, c, method=VQModel.decode_codes))
    side = module.config.downsampling
    rec, drawn, idx = [], [], []
    for i in range(0, n, 64):
        x = images[i:i + 64]
        out = apply(params, jnp.asarray(x))
        rec.append(np.asarray(out.reconstruction))
        idx.append(np.asarray(out.indices))
        drawn.append(np.asarray(decode(params, jnp.asarray(color_consistent_codes(x, idx[-1], side)))))
    y, x, codes = np.concatenate(rec), images, np.concatenate(idx)
    labels = palette_cells(x, side, PALETTE)
    return {"eval_color_purity": color_purity(codes, labels, module.config.n_embed, len(PALETTE)),"eval_mse": float(np.mean((np.clip(y, 0, 1) - x) ** 2)),
            "eval_l1": float(np.mean(np.abs(np.clip(y, 0, 1) - x))),
            "eval_drawn_l1": float(np.mean(np.abs(np.clip(np.concatenate(drawn), 0, 1) - x))),
            "eval_code_consistency": code_consistency(x, codes, side),
            **{f"eval_{k}": v for k, v in codebook_usage(codes, module.config.n_embed).items()}}


def train_vqgan(
    out: Path, model_cfg: VQGANConfig, cfg: VQGANTrainConfig, seed: int = 0, deadline: float | None = None,
    workers: int = 0,
) -> tuple[VQGANConfig, Any, dict[str, Any]]:
    """Train (or resume) the VQGAN under `out/vqgan/`; exports `out/vqgan/model/` at every save.
    `workers` processes render the training images ahead of the steps.

    Returns the config, the trained params and a report (losses, codebook usage, timings).
    """
    folder = out / PHASE
    log = PhaseLog(folder, PHASE)
    t0 = time.time()
    module = build_vqgan(model_cfg)
    params = init_params(module, jax.random.PRNGKey(phase_seed(seed, "vqgan-init")))

    optim = OptimConfig(cfg.lr, cfg.warmup)
    tx = make_optimizer(optim)
    state = start_state(folder, log, params, tx, cfg.steps, cfg.seconds,
                        usage=np.zeros(model_cfg.n_embed, np.int64))
    train_step = make_train_step(module, tx, cfg)
    encode = make_encoder(module)

    images = Prefetcher(partial(images_for_step, seed, n=cfg.batch_size), workers)

    def step_fn(st: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        x = jnp.asarray(images(step))
        p = st["params"]
        restart_until = cfg.restart_until * (st["total_steps"] or 10**9)
        if step == cfg.init_codebook_at or (
            step > cfg.init_codebook_at and step % cfg.restart_every == 0 and step <= restart_until
        ):
            rng = np.random.default_rng(phase_seed(seed, "vqgan-codes", step))
            usage = st["usage"]
            p, st["usage"], restarted = _restart_codes(
                p, usage, encode, x, rng, everything=step == cfg.init_codebook_at
            )
            p, separated = _separate_colors(p, usage, encode, x, model_cfg.downsampling)
        else:
            restarted = separated = 0
        order = np.random.default_rng(phase_seed(seed, "vqgan-mosaic", step)).permutation(model_cfg.num_codes)
        p, opt_state, metrics, indices = train_step(p, st["opt_state"], x, jnp.asarray(order))
        st["usage"] = st["usage"] + np.bincount(np.asarray(indices).reshape(-1), minlength=model_cfg.n_embed)
        st["params"], st["opt_state"] = p, opt_state
        return st, {**metrics, "restarted": restarted, "separated": separated}

    def export(st: dict[str, Any]) -> None:
        save_vqgan(folder / "model", model_cfg, st["params"])

    with images:
        state = run_loop(folder, log, state, step_fn, optim, cfg.save_every, cfg.log_every,
                         remaining(cfg.seconds, t0), deadline, export)
    report = {"steps": int(state["step"]), "total_steps": int(state["total_steps"]), "batch_size": cfg.batch_size,
              "train_seconds": round(time.time() - t0, 1),
              **evaluate(module, state["params"], seed, cfg.eval_images)}
    log(int(state["step"]), **report)
    write_json(folder / "report.json", report)
    if report["eval_color_purity"] < cfg.min_color_purity:
        raise SystemExit(
            f"The trained VQGAN's codes mix object colours (colour purity {report['eval_color_purity']:.3f}, "
            f"below {cfg.min_color_purity}): DalleBart trained on them would draw one colour for another. "
            f"Remove {folder} and train again with another --seed.")
    return model_cfg, state["params"], report


def _restart_codes(params: Any, usage: np.ndarray, encode, x: jax.Array, rng: np.random.Generator,
                   everything: bool) -> tuple[Any, np.ndarray, int]:
    """Move all codes (`everything`) or the unused ones onto random encoder outputs of batch x."""
    rows = np.arange(usage.size) if everything else np.flatnonzero(usage == 0)
    if rows.size:
        z = np.asarray(encode(params, x)[0])
        picks = z[rng.integers(0, z.shape[0], rows.size)]
        noise = rng.normal(0.0, 0.01 * (z.std() + 1e-6), picks.shape)
        params = replace_codes(params, rows, (picks + noise).astype(np.float32))
    return params, np.zeros_like(usage), int(rows.size)


def _separate_colors(params: Any, usage: np.ndarray, encode, x: jax.Array, side: int) -> tuple[Any, int]:
    """Give each object colour of batch x whose cells sit on codes it owns less than OWN_SHARE of
    the time a code of its own: the least-used code (by `usage`) that no colour's cell picked,
    moved onto the mean encoder output of that colour's cells. Returns params and the codes moved."""
    z, indices = (np.asarray(a) for a in encode(params, x))
    labels = palette_cells(np.asarray(x), side, PALETTE).reshape(-1)
    counts = code_owners(indices, labels, usage.size, len(PALETTE))
    owner = np.where(counts.sum(1) > 0, counts.argmax(1), -1)
    spare = [int(c) for c in np.argsort(usage, kind="stable") if counts[c].sum() == 0]
    codes, moved = indices.reshape(-1), []
    for color in range(len(PALETTE)):
        cells = labels == color
        if cells.any() and spare and np.mean(owner[codes[cells]] == color) < OWN_SHARE:
            moved.append((spare.pop(0), z[cells].mean(0)))
    if moved:
        rows, vectors = zip(*moved)
        params = replace_codes(params, np.array(rows), np.stack(vectors).astype(np.float32))
    return params, len(moved)
