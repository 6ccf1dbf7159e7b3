"""CLIP parity: a clip_* reference folder's expected.npz against dalle_app.models.clip.

Works for any CLIP folder (sizes, activations, either weight format): everything is read from
the folder. The reference pixels are NCHW (transformers' layout); ours are NHWC.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dalle_app.models.clip import CLIP, load_clip

EMBEDS_ATOL = 1e-5  # unit-norm embeddings; the originals agree among themselves to ~1e-5
LOGITS_ATOL = 1e-4  # logits are up to exp(logit_scale) ~ 100 times a cosine
PIXELS_ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def _loaded(folder: Path) -> tuple[CLIP, dict[str, np.ndarray]]:
    """One load per folder for all checks (explicit cache: checkpoints are read-only fixtures)."""
    with np.load(folder / "expected.npz") as npz:
        expected = {k: npz[k] for k in npz.files}
    return load_clip(folder), expected


def _nhwc(pixels_nchw: np.ndarray) -> np.ndarray:
    return pixels_nchw.transpose(0, 2, 3, 1)


def check_text_embeds(folder: Path) -> None:
    clip, exp = _loaded(folder)
    got = clip.text_embeds(clip.params, exp["input_ids"], exp["attention_mask"])
    np.testing.assert_allclose(np.asarray(got), exp["text_embeds"], rtol=0, atol=EMBEDS_ATOL)


def check_image_embeds(folder: Path) -> None:
    clip, exp = _loaded(folder)
    got = clip.image_embeds(clip.params, _nhwc(exp["pixel_values_nchw"]))
    np.testing.assert_allclose(np.asarray(got), exp["image_embeds"], rtol=0, atol=EMBEDS_ATOL)


def check_logits_per_image(folder: Path) -> None:
    clip, exp = _loaded(folder)
    got = clip.logits_per_image(clip.params, _nhwc(exp["pixel_values_nchw"]), exp["input_ids"],
                                exp["attention_mask"])
    np.testing.assert_allclose(np.asarray(got), exp["logits_per_image"], rtol=0, atol=LOGITS_ATOL)


def check_preprocessing(folder: Path) -> None:
    clip, exp = _loaded(folder)
    names = sorted((k for k in exp if k.startswith("raw_image_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    raw = [exp[k] for k in names]
    got = clip.preprocess(raw)
    np.testing.assert_allclose(got, _nhwc(exp["pixel_values_nchw"]), rtol=0, atol=PIXELS_ATOL)


def _has_raw_images(folder: Path) -> bool:
    with np.load(folder / "expected.npz") as npz:
        return any(k.startswith("raw_image_") for k in npz.files)


check_preprocessing.applies = _has_raw_images

CHECKS = {
    "text_embeds": check_text_embeds,
    "image_embeds": check_image_embeds,
    "logits_per_image": check_logits_per_image,
    "preprocessing": check_preprocessing,
}
