"""Parity of dalle_app.models.dallebart with dalle-mini 0.1.5 on a reference folder's expected.npz.

Works for any DalleBart folder (config.json + flax_model.msgpack, scanned or not, + expected.npz):
every size comes from its config. The token inputs are taken from expected.npz as they are (the
text pipeline has its own checks). Models and outputs are cached per folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dalle_app.models.dallebart import DalleBartModel, load_dallebart
from dalle_app.sampling import guide

ATOL = 1e-4  # hidden states and logits; the original implementations agree to ~1e-5 in float32
TIE_MARGIN = 1e-4  # a greedy step whose best/second-best gap is below this may go either way


@functools.lru_cache(maxsize=4)
def _model(folder: Path) -> DalleBartModel:
    return load_dallebart(folder)


@functools.lru_cache(maxsize=4)
def _expected(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@functools.lru_cache(maxsize=8)
def _encoded(folder: Path, uncond: bool = False) -> np.ndarray:
    exp, m = _expected(folder), _model(folder)
    suffix = "_uncond" if uncond else ""
    return np.asarray(m.encode(m.params, exp["input_ids" + suffix], exp["attention_mask" + suffix]))


def _teacher_forced(folder: Path, decoder_input_ids: np.ndarray, uncond: bool = False) -> np.ndarray:
    exp, m = _expected(folder), _model(folder)
    mask = exp["attention_mask_uncond" if uncond else "attention_mask"]
    return np.asarray(m.decode(m.params, decoder_input_ids, _encoded(folder, uncond), mask))


def _assert_close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    err = float(np.abs(got - want).max())
    assert err <= ATOL, f"{name} differs by up to {err:.3g} (allowed {ATOL})"


def check_encoder_hidden(folder: Path) -> None:
    _assert_close("encoder_hidden", _encoded(folder), _expected(folder)["encoder_hidden"])


def check_logits(folder: Path) -> None:
    exp = _expected(folder)
    _assert_close("teacher-forced logits", _teacher_forced(folder, exp["decoder_input_ids"]), exp["logits"])


def check_kv_cache_logits(folder: Path) -> None:
    """decode_step, one position at a time through the cache, equals teacher forcing."""
    exp, m = _expected(folder), _model(folder)
    ids = jnp.asarray(exp["decoder_input_ids"])
    mask = jnp.asarray(exp["attention_mask"])
    cross = m.cross_kv(m.params, jnp.asarray(_encoded(folder)))
    cache = m.init_cache(ids.shape[0])
    step = jax.jit(m.decode_step, donate_argnums=(3,))
    steps = []
    for t in range(ids.shape[1]):
        logits, cache = step(m.params, ids[:, t], jnp.int32(t), cache, cross, mask)
        steps.append(np.asarray(logits))
    _assert_close("step-by-step logits", np.stack(steps, axis=1), exp["logits"])


def _check_greedy(folder: Path, scale: float) -> None:
    """Super-conditioned greedy codes, checked step by step by teacher forcing on the reference
    sequence: at every step our argmax over image codes must be the reference's choice, except
    where the reference's own best/second-best gap is below TIE_MARGIN. The conditional and
    unconditional logits are mixed by the sampler's own guidance function, so a change to it is
    caught here."""
    exp, cfg = _expected(folder), _model(folder).config
    key = f"cond{scale:g}"
    want, margin = exp[f"greedy_{key}"], exp[f"margin_{key}"]
    bos = np.full((want.shape[0], 1), cfg.decoder_start_token_id, want.dtype)
    inputs = np.concatenate([bos, want[:, :-1]], axis=1)
    cond = _teacher_forced(folder, inputs)
    uncond = _teacher_forced(folder, inputs, uncond=True)
    rows = cond.shape[0] * cond.shape[1]  # guide() mixes (rows, vocab) with one scale per row
    combined = np.asarray(guide(jnp.asarray(cond.reshape(rows, -1)), jnp.asarray(uncond.reshape(rows, -1)),
                                jnp.full((rows,), scale, jnp.float32))).reshape(cond.shape)
    got = combined[..., : cfg.image_vocab_size].argmax(-1)
    wrong = (got != want) & (margin >= TIE_MARGIN)
    assert not wrong.any(), (
        f"greedy {key}: {int(wrong.sum())} of {want.size} steps pick another code "
        f"(first at row/step {np.argwhere(wrong)[0].tolist()})"
    )


def check_greedy_cond1(folder: Path) -> None:
    _check_greedy(folder, 1.0)


def check_greedy_cond3(folder: Path) -> None:
    _check_greedy(folder, 3.0)


CHECKS = {
    "encoder_hidden": check_encoder_hidden,
    "logits": check_logits,
    "kv_cache_logits": check_kv_cache_logits,
    "greedy_cond1": check_greedy_cond1,
    "greedy_cond3": check_greedy_cond3,
}
