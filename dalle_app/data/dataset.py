"""Seeded samples, batches and evaluation prompts of the procedural world.

``sample(rng, "train")`` never shows a held-out combination (see ``world``); ``sample(rng,
"heldout")`` always shows one of the test split, ``sample(rng, "validation")`` one of the
validation split. Objects sit on the cell grid (see ``shapes``); scenes are laid
out so that a relation is unambiguous: along the relation's axis the objects are apart, across
it nearly aligned. Same seed, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dalle_app.data import captions
from dalle_app.data.shapes import render
from dalle_app.data.world import (
    CELL,
    COLORS,
    GRID,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    INVERSE,
    PLACE,
    RELATIONS,
    SIZES,
    VALIDATION_PAIRS,
    ObjectSpec,
    is_heldout_scene,
    split_triples,
    training_pairs,
)

Split = Literal["train", "validation", "heldout"]  # "heldout": the test split
SPLIT_PAIRS = {"heldout": HELDOUT_PAIRS, "validation": VALIDATION_PAIRS}
MIN_GAP_CELLS = 1  # free cells between the two objects' boxes along the relation axis
ACROSS_ROOM = 1.5  # cells an object's center may stray from the middle across the relation axis
SINGLE_FRACTION = 0.4  # share of one-object scenes


@dataclass(frozen=True)
class Sample:
    """A rendered scene; ``relation`` reads 'objects[0] relation objects[1]' (None for one object)."""

    image: np.ndarray  # uint8 (64, 64, 3)
    caption: str
    objects: list[ObjectSpec]
    relation: str | None


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 (n, 64, 64, 3)
    captions: list[str]
    samples: list[Sample]


@dataclass(frozen=True)
class Target:
    """What a prompt asks for about one object; ``size`` None means any size."""

    color: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt with what a correct image shows ('targets[0] relation targets[1]')."""

    text: str
    targets: list[Target]
    relation: str | None
    kind: Literal["single", "relation"]


def _cells(size: str) -> int:
    return SIZES[size] // CELL


def _placed(lo: int, hi: int) -> list[int]:
    """The placement cells (multiples of PLACE) in [lo, hi]."""
    return list(range(math.ceil(lo / PLACE) * PLACE, hi + 1, PLACE))


def _across_start(n: int, rng: np.random.Generator) -> int:
    """First cell, across the relation axis, of an n-cell object kept near the middle (center
    within ACROSS_ROOM cells of the image's)."""
    lo = math.ceil(GRID / 2 - n / 2 - ACROSS_ROOM)
    hi = math.floor(GRID / 2 - n / 2 + ACROSS_ROOM)
    return int(_pick(rng, _placed(lo, hi)))


def _single_layout(n: int, rng: np.random.Generator) -> tuple[int, int]:
    """First cell (column, row) of a lone n-cell object anywhere on the grid."""
    starts = _placed(0, GRID - n)
    return int(_pick(rng, starts)), int(_pick(rng, starts))


def _pair_layout(n_a: int, n_b: int, relation: str, rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """First cells (column, row) of A and B such that 'A relation B' is clear: along the axis
    their boxes are at least one cell apart, across it their centers differ by at most
    2 * ACROSS_ROOM cells, less than the along distance (at least 6 cells). The distance is drawn
    first, uniformly among those that fit, then where the pair starts."""
    first, second = (n_a, n_b) if relation in ("above", "left of") else (n_b, n_a)
    last_first = GRID - first - MIN_GAP_CELLS - second
    fits = [(s1, s2) for s1 in _placed(0, last_first) for s2 in _placed(s1 + first + MIN_GAP_CELLS, GRID - second)]
    distance = int(_pick(rng, sorted({s2 - s1 for s1, s2 in fits})))
    along = _pick(rng, [(s1, s2) for s1, s2 in fits if s2 - s1 == distance])
    across = (_across_start(first, rng), _across_start(second, rng))
    if relation in ("above", "below"):
        starts = ((across[0], along[0]), (across[1], along[1]))
    else:
        starts = ((along[0], across[0]), (along[1], across[1]))
    return starts if relation in ("above", "left of") else (starts[1], starts[0])


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def _scene(
    rng: np.random.Generator, split: Split
) -> tuple[list[tuple[str, str]], str | None]:
    """(color, shape) of each object and the relation, drawn for the split."""
    train = training_pairs()
    if split == "train":
        if rng.random() < SINGLE_FRACTION:
            return [_pick(rng, train)], None
        while True:
            a, b = _pick(rng, train), _pick(rng, train)
            relation = _pick(rng, list(RELATIONS))
            dummy = [ObjectSpec(*a, "small", (0, 0)), ObjectSpec(*b, "small", (0, 0))]
            if a != b and not is_heldout_scene(dummy, relation):
                return [a, b], relation
    if split not in SPLIT_PAIRS:
        raise ValueError(f"split must be 'train', 'validation' or 'heldout', got {split!r}")
    if rng.random() < SINGLE_FRACTION:
        return [_pick(rng, sorted(SPLIT_PAIRS[split]))], None
    ca, sa, relation, cb, sb = _pick(rng, list(split_triples(split)))
    if rng.random() < 0.5:
        return [(cb, sb), (ca, sa)], INVERSE[relation]
    return [(ca, sa), (cb, sb)], relation


def sample(rng: np.random.Generator, split: Split = "train") -> Sample:
    """One captioned scene of the split, drawn from ``rng``."""
    pairs, relation = _scene(rng, split)
    return _compose(pairs, [_pick(rng, list(SIZES)) for _ in pairs], relation, rng)


def render_prompt(prompt: Prompt, rng: np.random.Generator) -> Sample:
    """A ground-truth image of what ``prompt`` asks (sizes drawn where the prompt leaves them free).

    The caption is a fresh wording of the scene, not ``prompt.text``.
    """
    pairs = [(t.color, t.shape) for t in prompt.targets]
    sizes = [t.size or _pick(rng, list(SIZES)) for t in prompt.targets]
    return _compose(pairs, sizes, prompt.relation, rng)


def _compose(
    pairs: list[tuple[str, str]], sizes: list[str], relation: str | None, rng: np.random.Generator
) -> Sample:
    cells = [_cells(size) for size in sizes]
    if relation is None:
        starts = [_single_layout(cells[0], rng)]
    else:
        starts = list(_pair_layout(cells[0], cells[1], relation, rng))
    centers = [(CELL * (x + n / 2), CELL * (y + n / 2)) for (x, y), n in zip(starts, cells)]
    sides = [CELL * n for n in cells]
    objects = [ObjectSpec(c, s, size, center) for (c, s), size, center in zip(pairs, sizes, centers)]
    image = render(objects, sides, rng)
    if relation is None:
        caption = captions.single_caption(objects[0], rng)
    else:
        caption = captions.pair_caption(objects[0], relation, objects[1], rng)
    return Sample(image=image, caption=caption, objects=objects, relation=relation)


def batch(seed: int, n: int, split: Split = "train") -> Batch:
    """``n`` samples from ``np.random.default_rng(seed)``: identical for identical arguments."""
    rng = np.random.default_rng(seed)
    samples = [sample(rng, split) for _ in range(n)]
    images = np.stack([s.image for s in samples]) if samples else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return Batch(images=images, captions=[s.caption for s in samples], samples=samples)


def _single_prompts(split: str) -> list[Prompt]:
    prompts = []
    for size in (None, "small", "large"):
        for color, shape in sorted(SPLIT_PAIRS[split], key=lambda p: (list(COLORS).index(p[0]), p[1])):
            text = captions.with_article(captions.noun_phrase(color, shape, size))
            prompts.append(Prompt(text, [Target(color, shape, size)], None, "single"))
    return prompts


def _relation_prompts(split: str, seed: int) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    triples = list(split_triples(split))
    prompts = []
    for index in rng.permutation(len(triples)):
        ca, sa, relation, cb, sb = triples[index]
        a, b = Target(ca, sa), Target(cb, sb)
        if rng.random() < 0.5:
            a, b, relation = b, a, INVERSE[relation]
        text = "{} {} {}".format(
            captions.with_article(f"{a.color} {a.shape}"), relation, captions.with_article(f"{b.color} {b.shape}")
        )
        prompts.append(Prompt(text, [a, b], relation, "relation"))
    return prompts


def heldout_prompts(n: int, seed: int = 0, split: Split = "heldout") -> list[Prompt]:
    """``n`` evaluation prompts of ``split`` ("heldout": the test split, or "validation"),
    alternating one-object pairs and relations.

    Single prompts ("a small yellow circle") cover each of the split's pairs without a size, then
    small, then large; relation prompts ("a red square above a blue circle") are the split's
    triples in an order fixed by ``seed``. When one kind runs out the other fills the list.
    """
    if split not in SPLIT_PAIRS:
        raise ValueError(f"prompts come from the 'heldout' (test) or 'validation' split, not {split!r}")
    singles, relations = _single_prompts(split), _relation_prompts(split, seed)
    out: list[Prompt] = []
    while len(out) < n and (singles or relations):
        for pool in (singles, relations):
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return out


__all__ = ["Batch", "Prompt", "Sample", "Split", "Target", "batch", "heldout_prompts", "render_prompt", "sample"]
