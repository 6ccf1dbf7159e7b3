"""Rendering scenes of flat pixel-art shapes into 64x64 RGB images.

Shapes are drawn on a grid of CELL x CELL pixel cells, the VQGAN's downsampling factor, and
objects sit on that grid: every code of an object then holds one flat color, and a shape is only
*where* its color codes are. That is what lets a small model put a color on a shape it never saw
it on (the held-out pairs): color and shape are separate decisions in code space. Each shape is
a fixed odd-sized cell pattern (5x5 small, 7x7 large), drawn over a light, low-chroma background
that is plain or faintly textured in blocks of PLACE x PLACE cells. The same inputs always give
the same bytes.
"""

from __future__ import annotations

import numpy as np

from dalle_app.data.world import CELL, COLORS, IMAGE_SIZE, PLACE, ObjectSpec

COLOR_JITTER = 8  # per-channel jitter of an object's color, so the model sees some variety


def shape_cells(shape: str, n: int) -> np.ndarray:
    """The cell pattern (n, n) bool of a shape whose box is n cells wide (n odd, >= 5).

    Patterns are 8-connected and far apart from each other (intersection over union <= 0.84)."""
    if n % 2 == 0 or n < 5:
        raise ValueError(f"shapes are drawn on odd grids of at least 5 cells, got {n}")
    r = (n - 1) // 2
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    ay, ax = np.abs(dy), np.abs(dx)
    if shape == "square":
        return np.ones((n, n), bool)
    if shape == "circle":
        return dy**2 + dx**2 <= (r + 0.5) ** 2
    if shape == "diamond":
        return ay + ax <= r
    if shape == "triangle":  # apex on top: row k is 2 * ceil(k / 2) + 1 cells wide
        return ax <= (dy + r + 1) // 2
    if shape == "cross":  # a plus sign with one-cell arms
        return (ay == 0) | (ax == 0)
    if shape == "star":  # eight points: a plus, both diagonals and a solid 3x3 core
        return (ay == 0) | (ax == 0) | (ay == ax)
    raise ValueError(f"unknown shape {shape!r}; use one of square, circle, triangle, diamond, star, cross")


def shape_mask(shape: str, center: tuple[float, float], side: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in {0, 1} of one shape, shape (size, size): its cell pattern scaled to `side`
    pixels (a multiple of CELL) with the box centered on `center`."""
    n = int(round(side / CELL))
    if n * CELL != side:
        raise ValueError(f"side must be a multiple of {CELL} pixels, got {side}")
    left, top = int(round(center[0] - side / 2)), int(round(center[1] - side / 2))
    pattern = np.kron(shape_cells(shape, n), np.ones((CELL, CELL), bool)).astype(np.float32)
    out = np.zeros((size, size), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + int(side), size), min(left + int(side), size)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = pattern[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A light, nearly neutral float RGB background: plain, or a faint texture of PLACE x PLACE
    cell blocks (checkerboard, stripes or a two-tone split), so every cell of it is one flat tint."""
    base = rng.uniform(222, 248) + rng.uniform(-10, 10, size=3)
    kind = rng.choice(["plain", "checker", "stripes", "split"], p=[0.4, 0.2, 0.2, 0.2])
    cells = np.arange(size) // (CELL * PLACE)
    rows, cols = cells[:, None], cells[None, :]
    if kind == "checker":
        period = int(rng.choice([1, 2]))
        pattern = ((rows // period + cols // period) % 2).astype(np.float32)
    elif kind == "stripes":
        period = int(rng.choice([1, 2]))
        lines = rows if rng.random() < 0.5 else cols
        pattern = np.broadcast_to((lines // period) % 2, (size, size)).astype(np.float32)
    elif kind == "split":
        lines = rows if rng.random() < 0.5 else cols
        pattern = np.broadcast_to(lines >= size // (CELL * PLACE) // 2, (size, size)).astype(np.float32)
    else:
        pattern = np.zeros((size, size), np.float32)
    image = base + rng.uniform(6, 12) * (pattern - 0.5)[..., None]
    return np.clip(image, 200, 255).astype(np.float32)


def render(objects: list[ObjectSpec], sides: list[float], rng: np.random.Generator) -> np.ndarray:
    """Draw objects (with their box sides in pixels) over a random background: uint8 (64, 64, 3)."""
    image = background(rng)
    for obj, side in zip(objects, sides):
        color = np.asarray(COLORS[obj.color], np.float32) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3)
        alpha = shape_mask(obj.shape, obj.center, side)[..., None]
        image = image * (1 - alpha) + np.clip(color, 0, 255) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
