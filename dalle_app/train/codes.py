"""The codes DalleBart is trained on: the VQGAN's codes of a scene, made one code per color.

Scenes are flat per cell of the code grid, so a cell's color is all a code needs to say. The
VQGAN's locality loss makes the encoder nearly local, and `color_consistent_codes` removes what
is left: a code that still flips with a cell's surroundings is noise DalleBart would have to learn.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dalle_app.models.vqgan import VQModel


def color_groups(images: np.ndarray, side: int) -> np.ndarray:
    """(N, cells) int: which cells of each image share one color (a label per distinct color).

    `images` are (N, H, W, C) in [0, 1] or uint8, flat per side x side cell as the scenes are."""
    n, h, w, c = images.shape
    scale = 255.0 if images.dtype != np.uint8 else 1.0
    cells = np.rint(images.reshape(n, h // side, side, w // side, side, c).mean((2, 4)) * scale).reshape(n, -1, c)
    return np.stack([np.unique(colors, axis=0, return_inverse=True)[1].reshape(-1) for colors in cells])


def code_consistency(images: np.ndarray, indices: np.ndarray, side: int) -> float:
    """Share of cells whose code is the one most cells of the same color in the same image have:
    1.0 when codes are a function of the cell's own color."""
    agree = 0
    for groups, codes in zip(color_groups(images, side), indices.reshape(len(images), -1)):
        agree += sum(np.bincount(codes[groups == g]).max() for g in np.unique(groups))
    return agree / indices.size


def color_consistent_codes(images: np.ndarray, indices: np.ndarray, side: int) -> np.ndarray:
    """Codes (N, cells) where every cell of one color in an image takes that color's most common code."""
    out = np.array(indices).reshape(len(images), -1).copy()
    for groups, codes in zip(color_groups(images, side), out):
        for g in np.unique(groups):
            cells = groups == g
            codes[cells] = np.bincount(codes[cells]).argmax()
    return out


def code_encoder(module: VQModel) -> Callable[[Any, np.ndarray], np.ndarray]:
    """Jitted (params, images (N, H, W, C) in [0, 1]) → the codes DalleBart is trained on, (N, h*w):
    the encoder's codes made one per color by `color_consistent_codes`."""
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQModel.encode_pixels)[0])
    side = module.config.downsampling
    return lambda params, images: color_consistent_codes(images, np.asarray(encode(params, jnp.asarray(images))), side)
