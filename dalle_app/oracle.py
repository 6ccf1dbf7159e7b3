"""A programmatic judge of images of the procedural world: which objects are where.

It is how the embedded model is evaluated without a human: find the colored objects on the light
background, name their color, shape and size, and read relations from their positions.

* Readable scene: the border must be mostly a light background and at least half the image
  background; otherwise (noise, a dark or busy image) nothing is detected, so garbage never
  passes a prompt by chance.
* Foreground: pixels far (RGB distance) from the background, estimated as the median of the
  image border, so soft or tinted backgrounds of generated images still work.
* Objects: 8-connected components of the foreground, tiny blobs ignored. A component whose strong
  pixels have two dominant colors in different places (two generated objects touching) is split
  by color; two colors mixed in one place (a color drifting between two palette entries) are not.
* Color: the mean of a component's strongest pixels, nearest palette color; too far from every
  palette color, or gray, means "unknown" (None), which never matches a prompt.
* Shape: the component's coverage (estimated alpha) cropped to its box and resized to 16x16, then
  compared by soft IoU with templates rendered by the same code as the training images; a best
  score under SHAPE_MIN_SCORE means "unknown" (None).
* Size: the box side against the midpoint of the small and large sizes.
* Position: the center of the object's box; relation of A to B: the dominant axis of B's center
  minus A's, and its sign. The strict judgement asks the dominant offset to be at least
  RELATION_MARGIN times the other, as in every layout the generator draws (at least 7:3,
  ``dalle_app.data.dataset._pair_layout``): a diagonal pair is no relation at all.

Judging a prompt (``shows`` / ``satisfies``), strictly (the default): the image holds exactly the
asked objects and nothing else (an object of unknown color or shape counts too), in the asked
relation with the margin. Leniently (``lenient=True``, kept for comparison): some
detected objects match and stand in the asked relation without margin; other objects are
tolerated, so a model that draws extra objects gets extra chances.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from dalle_app.data.dataset import Prompt, Target
from dalle_app.data.shapes import shape_mask
from dalle_app.data.world import COLORS, SHAPES, SIZES, ObjectSpec

FOREGROUND_DISTANCE = 80.0  # RGB distance from the background that makes a pixel foreground
MIN_AREA = 20  # components smaller than this (pixels) are noise
COLOR_TOLERANCE = 120.0  # farther than this from every palette color: color unknown
MIN_CHROMA = 60.0  # an object's color needs max - min channel >= this (palette: >= 120); grays are unknown
STRONG_FRACTION = 0.6  # pixels with distance >= this x the component's 90th percentile are "strong"
SPLIT_SHARE = 0.25  # a second color owning this share of strong pixels splits a component ...
SPLIT_DISTANCE = 6.0  # ... when the two colors' centroids are at least this many pixels apart
SHAPE_MIN_SCORE = 0.7  # best template soft IoU below this: shape unknown (renders score >= 0.82)
BACKGROUND_MIN_LEVEL = 150.0  # the background's darkest channel must be at least this light ...
BACKGROUND_BORDER_SHARE = 0.6  # ... this share of the border must be background ...
BACKGROUND_IMAGE_SHARE = 0.5  # ... and this share of the whole image
TEMPLATE_RES = 16
TEMPLATE_BLURS = (0.0, 0.8, 1.3)  # Gaussian radii (pixels) of the blurred shape references
LARGE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2
RELATION_MARGIN = 2.0  # strict relation: dominant center offset >= this x the other (generator: >= 7/3)

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float32)


@dataclass(frozen=True)
class Detection:
    """An object found in an image; ``color`` / ``shape`` are None when nothing known is close enough."""

    color: str | None
    shape: str | None
    size: str
    center: tuple[float, float]  # (x, y) pixels, center of the box
    area: int
    shape_score: float  # soft IoU with the best template, 1.0 = perfect


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _readable(distance: np.ndarray, background: np.ndarray) -> bool:
    """A light background fills most of the border and at least half of the image."""
    is_background = distance < FOREGROUND_DISTANCE
    border = np.concatenate([is_background[:2].ravel(), is_background[-2:].ravel(),
                             is_background[:, :2].ravel(), is_background[:, -2:].ravel()])
    return bool(
        background.min() >= BACKGROUND_MIN_LEVEL
        and border.mean() >= BACKGROUND_BORDER_SHARE
        and is_background.mean() >= BACKGROUND_IMAGE_SHARE
    )


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (n, 2) array of (row, col).

    8, not 4: a star's diagonal arms touch its core only at corners."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        out.append(np.array(pixels))
    return out


def _nearest_color(rgb: np.ndarray) -> tuple[int, float]:
    distances = np.linalg.norm(_PALETTE - rgb, axis=-1)
    index = int(np.argmin(distances))
    return index, float(distances[index])


def _direction_labels(pixels_rgb: np.ndarray, background: np.ndarray, candidates: list[int]) -> np.ndarray:
    """Palette label per pixel by the direction of (pixel - background): blends keep the direction."""
    offsets = pixels_rgb - background
    offsets = offsets / (np.linalg.norm(offsets, axis=-1, keepdims=True) + 1e-6)
    refs = _PALETTE[candidates] - background
    refs = refs / (np.linalg.norm(refs, axis=-1, keepdims=True) + 1e-6)
    return np.asarray(candidates)[np.argmax(offsets @ refs.T, axis=-1)]


def _coverage(pixels_rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel, how much of its direction-nearest palette color covers it (0 = background, 1 = full)."""
    labels = _direction_labels(pixels_rgb, background, list(range(len(_PALETTE))))
    refs = _PALETTE[labels] - background
    return ((pixels_rgb - background) * refs).sum(-1) / ((refs * refs).sum(-1) + 1e-6)


def _normalized_crop(alpha: np.ndarray) -> np.ndarray:
    """The alpha map cropped to its alpha>0.5 box and resized to TEMPLATE_RES x TEMPLATE_RES."""
    rows, cols = np.nonzero(alpha > 0.5)
    crop = alpha[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize(
        (TEMPLATE_RES, TEMPLATE_RES), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized), 0, 1)


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Normalized crops of every shape, sharp and blurred, at both sizes.

    They go through the same alpha estimate as detected objects (a uniform object 200 RGB units
    from its background), so blurry generated shapes meet blurry references. Cached: constant.
    """
    out = {}
    for shape in SHAPES:
        crops = []
        for side in SIZES.values():
            coverage = Image.fromarray(np.uint8(255 * shape_mask(shape, (32, 32), side)))
            for blur in TEMPLATE_BLURS:
                blurred = coverage.filter(ImageFilter.GaussianBlur(blur)) if blur else coverage
                distance = 200.0 * np.asarray(blurred, np.float32) / 255.0
                pixels = max(_components(distance >= FOREGROUND_DISTANCE), key=len)
                crops.append(_normalized_crop(_alpha(pixels, distance)[0]))
        out[shape] = np.stack(crops)
    return out


def _classify_shape(alpha: np.ndarray) -> tuple[str, float]:
    crop = _normalized_crop(alpha)
    best, best_score = SHAPES[0], -1.0
    for shape, templates in _templates().items():
        scores = np.minimum(templates, crop).sum((1, 2)) / np.maximum(templates, crop).sum((1, 2))
        if scores.max() > best_score:
            best, best_score = shape, float(scores.max())
    return best, best_score


def _alpha(pixels: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Estimated coverage of a component over its box (+1 px of fringe), and the box's corner.

    Coverage is the distance from the background relative to the component's strong level (its
    90th percentile), so soft edges count partly and a faded object still reaches 1 inside.
    """
    rows, cols = pixels[:, 0], pixels[:, 1]
    strong_level = np.percentile(distance[rows, cols], 90)
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, distance.shape[0])
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, distance.shape[1])
    own = np.zeros(distance.shape, bool)
    own[rows, cols] = True
    own = own[r0:r1, c0:c1]
    fringe = np.zeros_like(own)
    fringe[1:], fringe[:-1] = fringe[1:] | own[:-1], fringe[:-1] | own[1:]
    fringe[:, 1:], fringe[:, :-1] = fringe[:, 1:] | own[:, :-1], fringe[:, :-1] | own[:, 1:]
    fringe &= distance[r0:r1, c0:c1] < FOREGROUND_DISTANCE  # never borrow another object's pixels
    return np.clip(distance[r0:r1, c0:c1] / strong_level, 0, 1) * (own | fringe), int(r0), int(c0)


def _describe(pixels: np.ndarray, image: np.ndarray, distance: np.ndarray, color: int | None) -> Detection | None:
    """One Detection from a component's pixels; None when too small."""
    if len(pixels) < MIN_AREA:
        return None
    rows, cols = pixels[:, 0], pixels[:, 1]
    d = distance[rows, cols]
    strong_level = np.percentile(d, 90)
    strong = d >= STRONG_FRACTION * strong_level
    if color is None:
        mean_color = image[rows[strong], cols[strong]].mean(axis=0)
        index, gap = _nearest_color(mean_color)
        known = gap <= COLOR_TOLERANCE and np.ptp(mean_color) >= MIN_CHROMA
        color_name = _PALETTE_NAMES[index] if known else None
    else:
        color_name = _PALETTE_NAMES[color]
    alpha, r0, c0 = _alpha(pixels, distance)
    shape, score = _classify_shape(alpha)
    if score < SHAPE_MIN_SCORE:
        shape = None
    box = alpha > 0.5
    box_rows, box_cols = np.nonzero(box)
    side = max(np.ptp(box_rows) + 1, np.ptp(box_cols) + 1)
    # the box center, like the generator's layout (a triangle's centroid sits lower than its box's)
    center = (c0 + (box_cols.min() + box_cols.max() + 1) / 2, r0 + (box_rows.min() + box_rows.max() + 1) / 2)
    return Detection(color_name, shape, "large" if side >= LARGE_THRESHOLD else "small", center, len(pixels), score)


def detect(image: np.ndarray) -> list[Detection]:
    """All objects in an RGB uint8 image (any square size is rescaled to 64x64), largest first."""
    array = np.asarray(image)
    if array.shape[:2] != (64, 64):
        array = np.asarray(Image.fromarray(array.astype(np.uint8)).convert("RGB").resize((64, 64), Image.Resampling.BOX))
    rgb = array[..., :3].astype(np.float32)
    background = _background(rgb)
    distance = np.linalg.norm(rgb - background, axis=-1)
    if not _readable(distance, background):
        return []
    found = []
    for pixels in _components(distance >= FOREGROUND_DISTANCE):
        if len(pixels) < MIN_AREA:
            continue
        rows, cols = pixels[:, 0], pixels[:, 1]
        d = distance[rows, cols]
        # strong: near the component's peak, or close to full coverage of its own palette color
        # (a pale color next to a dark one is never near the component's peak)
        strong = (d >= STRONG_FRACTION * np.percentile(d, 90)) | (_coverage(rgb[rows, cols], background) >= STRONG_FRACTION)
        labels = np.array([_nearest_color(p)[0] for p in rgb[rows[strong], cols[strong]]])
        values, counts = np.unique(labels, return_counts=True)
        dominant = [int(v) for v, n in zip(values, counts) if n >= SPLIT_SHARE * strong.sum() and n >= MIN_AREA / 2]
        if len(dominant) == 2:
            centroids = [pixels[strong][labels == label].mean(axis=0) for label in dominant]
            if np.hypot(*(centroids[0] - centroids[1])) < SPLIT_DISTANCE:
                dominant = []
        if len(dominant) < 2:
            found.append(_describe(pixels, rgb, distance, None))
            continue
        per_pixel = _direction_labels(rgb[rows, cols], background, dominant)
        for label in dominant:
            part = np.zeros(distance.shape, bool)
            part[rows[per_pixel == label], cols[per_pixel == label]] = True
            for sub in _components(part):
                found.append(_describe(sub, rgb, distance, label))
    detections = [d for d in found if d is not None]
    return sorted(detections, key=lambda d: -d.area)


def relation(a: Detection | ObjectSpec, b: Detection | ObjectSpec, margin: float = 1.0) -> str | None:
    """Where ``a`` is relative to ``b``: 'above', 'below', 'left of' or 'right of'; None when the
    dominant axis's offset is less than ``margin`` times the other's (1.0: never None)."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dy) >= abs(dx):
        return ("above" if dy > 0 else "below") if abs(dy) >= margin * abs(dx) else None
    return ("left of" if dx > 0 else "right of") if abs(dx) >= margin * abs(dy) else None


def matches(detection: Detection, target: Target) -> bool:
    return (
        detection.color == target.color
        and detection.shape == target.shape
        and (target.size is None or detection.size == target.size)
    )


def shows(found: list[Detection], prompt: Prompt, lenient: bool = False) -> bool:
    """Do these detections show what the prompt asks (see the module docstring: strict or lenient)?"""
    if not lenient and len(found) != len(prompt.targets):
        return False
    if prompt.relation is None:
        return any(matches(d, prompt.targets[0]) for d in found)
    first, second = prompt.targets
    margin = 1.0 if lenient else RELATION_MARGIN
    return any(
        matches(a, first) and matches(b, second) and relation(a, b, margin) == prompt.relation
        for i, a in enumerate(found)
        for j, b in enumerate(found)
        if i != j
    )


def satisfies(image: np.ndarray, prompt: Prompt, lenient: bool = False) -> bool:
    """Does the image show what the prompt asks? Strict unless ``lenient`` (module docstring)."""
    return shows(detect(image), prompt, lenient)


def recovers_scene(image: np.ndarray, objects: list[ObjectSpec], scene_relation: str | None) -> bool:
    """Exact check on a ground-truth render: same objects (color, shape, size), same relation
    with the strict margin."""
    found = detect(image)
    if Counter((d.color, d.shape, d.size) for d in found) != Counter((o.color, o.shape, o.size) for o in objects):
        return False
    for obj in objects:
        nearest = min(found, key=lambda d: np.hypot(d.center[0] - obj.center[0], d.center[1] - obj.center[1]))
        if (nearest.color, nearest.shape, nearest.size) != (obj.color, obj.shape, obj.size):
            return False
        if np.hypot(nearest.center[0] - obj.center[0], nearest.center[1] - obj.center[1]) > 2.0:
            return False
    if scene_relation is not None:
        by_attributes = {(d.color, d.shape): d for d in found}
        a, b = (by_attributes[(o.color, o.shape)] for o in objects)
        return relation(a, b, RELATION_MARGIN) == scene_relation
    return True
