"""The vocabulary of the procedural world and its fixed train / validation / test split.

The embedded model is trained on scenes of one or two flat pixel-art shapes on a light background. Some
combinations are *never* shown in training ("held out"), so evaluation can ask whether the model
composes attributes and relations it only saw apart. They form two disjoint splits:

* the test split (the data split named ``"heldout"``): the figures reported for a shipped model,
  measured once per model.
* the validation split (``"validation"``): for every recipe choice (steps, sampling settings...),
  so the test prompts never steer the recipe.

Each split has:

* (color, shape) pairs: ``HELDOUT_PAIRS`` (one per color, every shape at least once) and
  ``VALIDATION_PAIRS`` (one per shape, six colors). No training scene contains such an object,
  alone or next to another.
* relation triples: a two-object scene is written canonically as
  ``(color_a, shape_a, rel, color_b, shape_b)`` with ``rel`` in {"above", "left of"} ("below" and
  "right of" swap the objects). A triple of two training pairs goes by the first byte of
  ``sha256("red square above blue circle")`` (the canonical key): below ``HELDOUT_TRIPLE_BYTE``
  to the test split, below ``VALIDATION_TRIPLE_BYTE`` to validation (about 12% of triples each).
  Training never shows such a scene, whatever the caption's wording.

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
HELDOUT_TRIPLE_BYTE = 31  # first sha256 byte < 31 -> test split (31/256 ≈ 12%)
# Disjoint from HELDOUT_PAIRS and from each other's shapes, so a validation prompt asks for a
# pair as new to the model as a test prompt's.
VALIDATION_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("pink", "square"),
        ("green", "circle"),
        ("blue", "triangle"),
        ("yellow", "diamond"),
        ("orange", "star"),
        ("purple", "cross"),
    }
)
VALIDATION_TRIPLE_BYTE = 62  # first sha256 byte in [31, 62) -> validation split (≈ 12%)


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
    """True for a (color, shape) pair of the test split."""
    return (color, shape) in HELDOUT_PAIRS


def is_validation_pair(color: str, shape: str) -> bool:
    return (color, shape) in VALIDATION_PAIRS


def training_pairs() -> list[tuple[str, str]]:
    """Every (color, shape) pair training shows: neither a test nor a validation pair."""
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS | VALIDATION_PAIRS]


_TRAINING_PAIRS = frozenset(training_pairs())


def triple_split(a: tuple[str, str], relation: str, b: tuple[str, str]) -> str | None:
    """The split of the scene 'A relation B': "train", "validation" or "heldout" (test).

    None when A or B is itself a test or validation pair: such a scene is kept out of training
    through the pair already, and the triples test relations between known objects.
    """
    if a not in _TRAINING_PAIRS or b not in _TRAINING_PAIRS:
        return None
    key = "{} {} {} {} {}".format(*canonical_triple(a, relation, b))
    byte = hashlib.sha256(key.encode()).digest()[0]
    return "heldout" if byte < HELDOUT_TRIPLE_BYTE else "validation" if byte < VALIDATION_TRIPLE_BYTE else "train"


def is_heldout_triple(a: tuple[str, str], relation: str, b: tuple[str, str]) -> bool:
    """True when the scene 'A relation B' belongs to the test split's relation triples."""
    return triple_split(a, relation, b) == "heldout"


def is_validation_triple(a: tuple[str, str], relation: str, b: tuple[str, str]) -> bool:
    return triple_split(a, relation, b) == "validation"


def is_heldout_scene(objects: list[ObjectSpec], relation: str | None) -> bool:
    """True when a scene shows anything training must never show (test or validation)."""
    if any((o.color, o.shape) in HELDOUT_PAIRS | VALIDATION_PAIRS for o in objects):
        return True
    if len(objects) == 2 and relation is not None:
        a, b = objects
        return triple_split((a.color, a.shape), relation, (b.color, b.shape)) != "train"
    return False


@lru_cache(maxsize=2)
def split_triples(split: str) -> tuple[tuple[str, str, str, str, str], ...]:
    """All canonical triples of ``split`` ("heldout" or "validation"), sorted (cached: a pure
    function of the constants above)."""
    found = set()
    for a, b in itertools.permutations(training_pairs(), 2):
        for rel in ("above", "left of"):
            if triple_split(a, rel, b) == split:
                found.add(canonical_triple(a, rel, b))
    return tuple(sorted(found))


def heldout_triples() -> tuple[tuple[str, str, str, str, str], ...]:
    """All canonical test triples, sorted."""
    return split_triples("heldout")


def validation_triples() -> tuple[tuple[str, str, str, str, str], ...]:
    return split_triples("validation")
