"""The vocabulary of the procedural world and its fixed train / held-out split.

The embedded model is trained on scenes of one or two flat pixel-art shapes on a light background. Some
combinations are *never* shown in training, so evaluation can ask whether the model composes
attributes and relations it only saw apart:

* held-out (color, shape) pairs: ``HELDOUT_PAIRS`` (one per color, every shape at least once).
  No training scene contains such an object, alone or next to another.
* held-out relation triples: a two-object scene is written canonically as
  ``(color_a, shape_a, rel, color_b, shape_b)`` with ``rel`` in {"above", "left of"} ("below" and
  "right of" swap the objects). A triple of training pairs is held out when the first byte of
  ``sha256("red square above blue circle")`` (the canonical key) is below ``HELDOUT_TRIPLE_BYTE``
  (about 12% of triples). Training never shows such a scene, whatever the caption's wording.

Everything here is a constant or a pure function, so the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import lru_cache

IMAGE_SIZE = 64
CELL = 4  # pixels per side of a grid cell: objects are drawn and placed on this grid (the VQGAN's f4)
GRID = IMAGE_SIZE // CELL
# Objects start on every PLACE-th cell (and background textures come in PLACE x PLACE blocks): a
# quarter of the places, so DalleBart sees each shape at each of them four times as often.
PLACE = 2

# Saturated colors far apart in hue, all far from the light, low-chroma backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 20),
    "green": (40, 160, 60),
    "cyan": (20, 180, 205),
    "blue": (35, 70, 210),
    "purple": (125, 50, 175),
    "pink": (235, 80, 170),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "star", "cross")
# Side of the shape's bounding box in pixels: 5 and 7 cells.
SIZES: dict[str, int] = {"small": 5 * CELL, "large": 7 * CELL}
# Relation of object A to object B, as in "A above B".
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "diamond"),
        ("orange", "triangle"),
        ("yellow", "circle"),
        ("green", "square"),
        ("cyan", "cross"),
        ("blue", "star"),
        ("purple", "diamond"),
        ("pink", "triangle"),
    }
)
HELDOUT_TRIPLE_BYTE = 31  # first sha256 byte < 31 -> held out (31/256 ≈ 12%)


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: attributes plus its box center (x, y) in pixels of the 64x64 image."""

    color: str
    shape: str
    size: str
    center: tuple[float, float]


def canonical_triple(
    a: tuple[str, str], relation: str, b: tuple[str, str]
) -> tuple[str, str, str, str, str]:
    """(color, shape) of A, relation, (color, shape) of B, rewritten with 'above' / 'left of'."""
    if relation in ("below", "right of"):
        a, b, relation = b, a, INVERSE[relation]
    if relation not in ("above", "left of"):
        raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")
    return (a[0], a[1], relation, b[0], b[1])


def is_heldout_pair(color: str, shape: str) -> bool:
    return (color, shape) in HELDOUT_PAIRS


def is_heldout_triple(a: tuple[str, str], relation: str, b: tuple[str, str]) -> bool:
    """True when the scene 'A relation B' belongs to the held-out relation triples.

    Triples that contain a held-out pair are not in this set: they are excluded from training
    through the pair already, and the held-out triples test relations between known objects.
    """
    if is_heldout_pair(*a) or is_heldout_pair(*b):
        return False
    key = "{} {} {} {} {}".format(*canonical_triple(a, relation, b))
    return hashlib.sha256(key.encode()).digest()[0] < HELDOUT_TRIPLE_BYTE


def is_heldout_scene(objects: list[ObjectSpec], relation: str | None) -> bool:
    """True when a scene shows anything training must never show."""
    if any(is_heldout_pair(o.color, o.shape) for o in objects):
        return True
    if len(objects) == 2 and relation is not None:
        a, b = objects
        return is_heldout_triple((a.color, a.shape), relation, (b.color, b.shape))
    return False


def training_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]


@lru_cache(maxsize=1)
def heldout_triples() -> tuple[tuple[str, str, str, str, str], ...]:
    """All canonical held-out triples, sorted (cached: a pure function of the constants above)."""
    pairs = training_pairs()
    found = set()
    for a, b in itertools.permutations(pairs, 2):
        for rel in ("above", "left of"):
            if is_heldout_triple(a, rel, b):
                found.add(canonical_triple(a, rel, b))
    return tuple(sorted(found))
