"""Parity of dalle_app.models.vqgan with vqgan-jax on a reference folder's expected.npz.

Works for any VQGAN folder (config.json + flax_model.msgpack + expected.npz): every size is read
from its config. Loaded models and outputs are cached per folder so each quantity costs one run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dalle_app.models.vqgan import VQGAN, load_vqgan

DECODED_ATOL = 1e-4  # pixels; vqgan-jax vs taming agree to ~6e-6 in float32
QUANTIZED_ATOL = 1e-4


@functools.lru_cache(maxsize=4)
def _model(folder: Path) -> VQGAN:
    return load_vqgan(folder)


@functools.lru_cache(maxsize=4)
def _expected(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@functools.lru_cache(maxsize=4)
def _encoded(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    indices, quantized = _model(folder).encode(_expected(folder)["pixels"])
    return np.asarray(indices), np.asarray(quantized)


def check_decoded(folder: Path) -> None:
    exp = _expected(folder)
    got = np.asarray(_model(folder).decode(exp["codes"]))
    assert got.shape == exp["decoded"].shape, (got.shape, exp["decoded"].shape)
    err = float(np.abs(got - exp["decoded"]).max())
    assert err <= DECODED_ATOL, f"decoded pixels differ by up to {err:.3g} (allowed {DECODED_ATOL})"


def check_encoded_indices(folder: Path) -> None:
    want = _expected(folder)["encoded_indices"]
    got = _encoded(folder)[0]
    assert got.shape == want.shape and got.dtype == np.int32, (got.shape, got.dtype, want.shape)
    mismatched = int((got != want).sum())
    assert mismatched == 0, f"{mismatched} of {want.size} code indices differ"


def check_quantized(folder: Path) -> None:
    want = _expected(folder)["quantized"]
    got = _encoded(folder)[1]
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.abs(got - want).max())
    assert err <= QUANTIZED_ATOL, f"quantized latents differ by up to {err:.3g} (allowed {QUANTIZED_ATOL})"


CHECKS = {
    "decoded": check_decoded,
    "encoded_indices": check_encoded_indices,
    "quantized": check_quantized,
}
