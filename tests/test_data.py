"""The procedural world: determinism, the fixed validation and test splits, and captions that match the scene."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dalle_app.data import (
    COLORS,
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    SHAPES,
    VALIDATION_PAIRS,
    ObjectSpec,
    batch,
    canonical_triple,
    heldout_prompts,
    heldout_triples,
    is_heldout_pair,
    is_heldout_scene,
    is_heldout_triple,
    is_validation_pair,
    is_validation_triple,
    sample,
    triple_split,
    validation_triples,
)
from dalle_app.data.captions import RELATION_WORDS

N_MANY = 2000


@pytest.fixture(scope="module")
def train_batch():
    return batch(seed=123, n=N_MANY, split="train")


def test_same_seed_same_bytes():
    a, b = batch(7, 20), batch(7, 20)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.captions == b.captions
    assert batch(8, 20).images.tobytes() != a.images.tobytes()


def test_images_are_64x64_rgb_uint8(train_batch):
    assert IMAGE_SIZE == 64
    assert train_batch.images.shape == (N_MANY, 64, 64, 3)
    assert train_batch.images.dtype == np.uint8


def test_every_cell_of_a_scene_is_one_flat_color(train_batch):
    """Objects and textures sit on the CELL grid: each 4x4 cell is uniform, so each VQGAN code
    holds one color (what lets held-out color/shape pairs be composed in code space)."""
    from dalle_app.data.world import CELL

    images = train_batch.images[:300].astype(np.int16)
    cells = images.reshape(len(images), 64 // CELL, CELL, 64 // CELL, CELL, 3)
    assert (cells.max(axis=(2, 4)) == cells.min(axis=(2, 4))).all()


def test_background_textures_come_in_place_blocks(train_batch):
    """Away from the objects, each PLACE x PLACE block of cells is one flat tint, and some
    backgrounds are textured (not one tint everywhere)."""
    from dalle_app.data.shapes import shape_mask
    from dalle_app.data.world import CELL, PLACE, SIZES

    block = CELL * PLACE
    textured = 0
    for image, s in zip(train_batch.images[:200].astype(np.int16), train_batch.samples):
        covered = sum(shape_mask(o.shape, o.center, SIZES[o.size]) for o in s.objects) > 0
        tints = set()
        for y in range(0, 64, block):
            for x in range(0, 64, block):
                free = image[y:y + block, x:x + block][~covered[y:y + block, x:x + block]]
                if len(free):
                    assert (free == free[0]).all()
                    tints.add(tuple(free[0]))
        textured += len(tints) > 1
    assert 60 <= textured <= 160  # 60% of the backgrounds are textured


def test_objects_are_on_the_grid_with_their_size(train_batch):
    """Objects start on every PLACE-th cell, inside the image, and lone objects use every such
    place that fits."""
    from dalle_app.data.world import CELL, GRID, PLACE, SIZES

    lone_starts = set()
    for s in train_batch.samples:
        for o in s.objects:
            side = SIZES[o.size]
            left, top = o.center[0] - side / 2, o.center[1] - side / 2
            assert left % (CELL * PLACE) == 0 and top % (CELL * PLACE) == 0
            assert 0 <= left and left + side <= CELL * GRID and 0 <= top and top + side <= CELL * GRID
            if len(s.objects) == 1 and o.size == "small":
                lone_starts.add((left, top))
    places = range(0, CELL * (GRID - SIZES["small"] // CELL) + 1, CELL * PLACE)
    assert lone_starts == {(x, y) for x in places for y in places}


def test_shapes_are_distinct_connected_patterns():
    from dalle_app.data.shapes import shape_cells
    from dalle_app.oracle import _components

    for n in (5, 7):
        patterns = {shape: shape_cells(shape, n) for shape in SHAPES}
        for a in SHAPES:
            pa = patterns[a]
            assert pa[0].any() and pa[-1].any() and pa[:, 0].any() and pa[:, -1].any()  # fills its box
            assert len(_components(pa)) == 1  # one object for the oracle (8-connected)
            for b in SHAPES:
                if a < b:
                    iou = (pa & patterns[b]).sum() / (pa | patterns[b]).sum()
                    assert iou <= 0.85, (a, b, n, iou)
    with pytest.raises(ValueError, match="odd"):
        shape_cells("square", 6)


def test_split_is_fixed_and_covers_every_attribute():
    assert len(HELDOUT_PAIRS) == 8
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLORS)
    assert {s for _, s in HELDOUT_PAIRS} == set(SHAPES)
    triples = heldout_triples()
    assert 200 < len(triples) < 600
    # the same scene said either way is held out either way
    for ca, sa, rel, cb, sb in triples[:50]:
        inverse = {"above": "below", "left of": "right of"}[rel]
        assert is_heldout_triple((cb, sb), inverse, (ca, sa))
        assert canonical_triple((cb, sb), inverse, (ca, sa)) == (ca, sa, rel, cb, sb)


def test_validation_split_is_disjoint_from_training_and_test():
    assert len(VALIDATION_PAIRS) == 6
    assert not VALIDATION_PAIRS & HELDOUT_PAIRS
    assert sorted(s for _, s in VALIDATION_PAIRS) == sorted(SHAPES)  # every shape once
    validation, test = set(validation_triples()), set(heldout_triples())
    assert 200 < len(validation) < 600 and not validation & test
    for ca, sa, rel, cb, sb in validation_triples()[:50]:
        inverse = {"above": "below", "left of": "right of"}[rel]
        assert is_validation_triple((cb, sb), inverse, (ca, sa))
        assert not is_heldout_triple((ca, sa), rel, (cb, sb))
        assert not any(is_validation_pair(*p) or is_heldout_pair(*p) for p in ((ca, sa), (cb, sb)))
    # a triple holding a validation or test pair belongs to no triple split: the pair keeps it out
    (color, shape), other = sorted(VALIDATION_PAIRS)[0], ("red", "square")
    assert triple_split((color, shape), "above", other) is None
    assert is_heldout_scene([ObjectSpec(color, shape, "small", (0, 0))], None)


def test_validation_split_always_shows_a_validation_combination():
    for s in batch(6, 300, split="validation").samples:
        pairs = [(o.color, o.shape) for o in s.objects]
        assert not any(is_heldout_pair(*p) for p in pairs)
        if len(pairs) == 1:
            assert is_validation_pair(*pairs[0])
        else:
            assert is_validation_triple(pairs[0], s.relation, pairs[1])
    with pytest.raises(ValueError, match="validation"):
        sample(np.random.default_rng(0), "test")


def test_validation_prompts_are_validation_combinations():
    prompts = heldout_prompts(48, split="validation")
    assert prompts == heldout_prompts(48, split="validation")
    singles = [p for p in prompts if p.kind == "single"]
    assert len(singles) == 18  # the six pairs with no, small and large size; relations fill the rest
    assert {(p.targets[0].color, p.targets[0].shape) for p in singles} == set(VALIDATION_PAIRS)
    for p in prompts:
        if p.kind == "relation":
            a, b = p.targets
            assert is_validation_triple((a.color, a.shape), p.relation, (b.color, b.shape))


def _mentioned_pairs(caption: str) -> list[tuple[str, str]]:
    words = caption.split()
    return [(w, words[i + 1]) for i, w in enumerate(words[:-1]) if w in COLORS]


def test_training_never_shows_or_mentions_heldout_combinations(train_batch):
    for s in train_batch.samples:
        assert not is_heldout_scene(s.objects, s.relation), s
        for pair in _mentioned_pairs(s.caption):
            assert not is_heldout_pair(*pair) and not is_validation_pair(*pair), s.caption
    # both one- and two-object scenes, every relation
    counts = {n: sum(len(s.objects) == n for s in train_batch.samples) for n in (1, 2)}
    assert counts[1] > 0.3 * N_MANY and counts[2] > 0.5 * N_MANY
    assert {s.relation for s in train_batch.samples} == {None, "above", "below", "left of", "right of"}


def test_heldout_split_always_shows_a_heldout_combination():
    for s in batch(5, 300, split="heldout").samples:
        assert is_heldout_scene(s.objects, s.relation)


def _relation_in_caption(caption: str) -> str | None:
    for relation, words in RELATION_WORDS.items():
        for w in sorted(words, key=len, reverse=True):
            if re.search(rf" {w} (a|an) ", caption):
                return relation
    return None


@pytest.mark.parametrize("split", ["train", "validation", "heldout"])
def test_captions_describe_the_scene(split):
    inverse = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    rng = np.random.default_rng(99)
    for _ in range(500):
        s = sample(rng, split)
        said = _mentioned_pairs(s.caption)
        assert sorted(said) == sorted((o.color, o.shape) for o in s.objects), s.caption
        for size_word, size in (("tiny", "small"), ("little", "small"), ("big", "large"), ("small", "small"), ("large", "large")):
            for i, w in enumerate(s.caption.split()[:-1]):
                if w == size_word:
                    color = s.caption.split()[i + 1]
                    assert any(o.color == color and o.size == size for o in s.objects), s.caption
        if len(s.objects) == 2:
            a, b = s.objects
            relation = _relation_in_caption(s.caption)
            if relation is not None:
                first = said[0]
                expected = s.relation if first == (a.color, a.shape) else inverse[s.relation]
                assert relation == expected, (s.caption, s.relation)
            # geometry agrees with the relation: dominant axis and sign
            dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
            geometric = ("above" if dy > 0 else "below") if abs(dy) > abs(dx) else ("left of" if dx > 0 else "right of")
            assert geometric == s.relation
            assert max(abs(dx), abs(dy)) >= 2 * min(abs(dx), abs(dy))


def test_heldout_prompts_are_heldout_and_deterministic():
    prompts = heldout_prompts(40)
    assert len(prompts) == 40
    assert prompts == heldout_prompts(40)
    assert {p.kind for p in prompts} == {"single", "relation"}
    for p in prompts:
        if p.kind == "single":
            (t,) = p.targets
            assert is_heldout_pair(t.color, t.shape)
            assert p.text.endswith(f"{t.color} {t.shape}")
        else:
            a, b = p.targets
            assert is_heldout_triple((a.color, a.shape), p.relation, (b.color, b.shape))
            assert f" {p.relation} " in p.text
