"""Rendering scenes of flat shapes into 64x64 RGB images.

Each shape's coverage mask is drawn with PIL at 4x resolution and box-filtered down, which gives
anti-aliased edges; the object color is then blended onto a light, low-chroma background that is
plain, a soft gradient or faint smooth noise. The same inputs always give the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from dalle_app.data.world import COLORS, IMAGE_SIZE, ObjectSpec

SUPERSAMPLE = 4
COLOR_JITTER = 8  # per-channel jitter of an object's color, so the model sees some variety


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return vertices


def _cross(half_width: float = 0.36) -> list[tuple[float, float]]:
    w = half_width
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
            (-1, w), (-1, -w), (-w, -w)]


def _fit_unit_box(vertices: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Stretch a polygon so its bounding box is exactly [-1, 1]^2: 'size' is then the box side."""
    xs, ys = zip(*vertices)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [(2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in vertices]


# Polygons in a unit box [-1, 1]^2, y pointing down; "circle" is drawn as an ellipse.
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "star": _fit_unit_box(_star()),
    "cross": _cross(),
}


def shape_mask(shape: str, center: tuple[float, float], side: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of one shape, shape (size, size), anti-aliased by 4x supersampling."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, half = center[0] * s, center[1] * s, side * s / 2
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
    elif shape in POLYGONS:
        draw.polygon([(cx + half * x, cy + half * y) for x, y in POLYGONS[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {sorted([*POLYGONS, 'circle'])}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A light, nearly neutral float RGB background: plain, soft gradient or faint smooth noise."""
    base = rng.uniform(222, 248) + rng.uniform(-10, 10, size=3)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    kind = rng.choice(["plain", "gradient", "noise"], p=[0.5, 0.25, 0.25])
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(angle) * np.arange(size)[None, :] + np.sin(angle) * np.arange(size)[:, None]
        ramp = (ramp - ramp.mean()) / (np.ptp(ramp) + 1e-6)
        image = image + rng.uniform(8, 16) * ramp[..., None]
    elif kind == "noise":
        coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
        smooth = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        image = image + rng.uniform(3, 6) * np.asarray(smooth)[..., None]
    return np.clip(image, 200, 255)


def render(objects: list[ObjectSpec], sides: list[float], rng: np.random.Generator) -> np.ndarray:
    """Draw objects (with their box sides in pixels) over a random background: uint8 (64, 64, 3)."""
    image = background(rng)
    for obj, side in zip(objects, sides):
        color = np.asarray(COLORS[obj.color], np.float32) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3)
        alpha = shape_mask(obj.shape, obj.center, side)[..., None]
        image = image * (1 - alpha) + np.clip(color, 0, 255) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
