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


def palette_cells(images: np.ndarray, side: int, palette: np.ndarray, tolerance: float = 25.0) -> np.ndarray:
    """(N, cells) int: the index of the `palette` colour (K, 3) in 0-255 each cell shows, -1 for
    cells near none of them (backgrounds, the edges of objects)."""
    n, h, w, c = images.shape
    scale = 255.0 if images.dtype != np.uint8 else 1.0
    cells = images.reshape(n, h // side, side, w // side, side, c).astype(np.float32).mean((2, 4)) * scale
    distance = np.linalg.norm(cells.reshape(n, -1, 1, c) - np.asarray(palette, np.float32), axis=-1)
    return np.where(distance.min(-1) < tolerance, distance.argmin(-1), -1)


def code_owners(indices: np.ndarray, labels: np.ndarray, n_codes: int, n_colors: int) -> np.ndarray:
    """(n_codes, n_colors) counts of the cells of each palette colour (`labels` ≥ 0) on each code."""
    counts = np.zeros((n_codes, n_colors), np.int64)
    shown = labels >= 0
    np.add.at(counts, (np.asarray(indices).reshape(labels.shape)[shown], labels[shown]), 1)
    return counts


def color_purity(indices: np.ndarray, labels: np.ndarray, n_codes: int, n_colors: int) -> float:
    """Share of the palette-coloured cells whose code is used mostly by their own colour: 1.0 when
    no code stands for two object colours (a code shared by two of them draws one as the other)."""
    counts = code_owners(indices, labels, n_codes, n_colors)
    return float(counts.max(1).sum() / max(1, counts.sum()))


def code_encoder(module: VQModel) -> Callable[[Any, np.ndarray], np.ndarray]:
    """Jitted (params, images (N, H, W, C) in [0, 1]) → the codes DalleBart is trained on, (N, h*w):
    the encoder's codes made one per color by `color_consistent_codes`."""
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQModel.encode_pixels)[0])
    side = module.config.downsampling
    return lambda params, images: color_consistent_codes(images, np.asarray(encode(params, jnp.asarray(images))), side)
