"""Varied English captions for scenes, so the model learns words rather than one template.

Every caption names each object's color and shape; size words ("small", "large", "big", "tiny")
appear only some of the time; two-object captions name the relation in most wordings, from
either object's point of view ("a red square above a blue circle" / "a blue circle below a red
square").
"""

from __future__ import annotations

import numpy as np

from dalle_app.data.world import INVERSE, ObjectSpec

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
}
SINGLE_TEMPLATES = (
    "{np}",
    "{np}",
    "{np_bare}",
    "there is {np}",
    "{np} on a plain background",
    "an image of {np}",
    "a picture of {np}",
    "a drawing of {np}",
)
PAIR_TEMPLATES = (
    "{a} {rel} {b}",
    "{a} {rel} {b}",
    "there is {a} {rel} {b}",
    "{a} is {rel} {b}",
    "{a} placed {rel} {b}",
    "an image of {a} {rel} {b}",
)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(color: str, shape: str, size: str | None) -> str:
    """'small red square' / 'red square' (no article)."""
    return f"{size} {color} {shape}" if size else f"{color} {shape}"


def _object_phrase(obj: ObjectSpec, rng: np.random.Generator, size_prob: float) -> str:
    size = rng.choice(SIZE_WORDS[obj.size]) if rng.random() < size_prob else None
    return noun_phrase(obj.color, obj.shape, size)


def single_caption(obj: ObjectSpec, rng: np.random.Generator) -> str:
    bare = _object_phrase(obj, rng, size_prob=0.5)
    template = SINGLE_TEMPLATES[rng.integers(len(SINGLE_TEMPLATES))]
    return template.format(np=with_article(bare), np_bare=bare)


def pair_caption(a: ObjectSpec, relation: str, b: ObjectSpec, rng: np.random.Generator) -> str:
    """Caption of 'a relation b'; half the time said from b's side with the inverse relation."""
    if rng.random() < 0.5:
        a, b, relation = b, a, INVERSE[relation]
    pa = with_article(_object_phrase(a, rng, size_prob=0.3))
    pb = with_article(_object_phrase(b, rng, size_prob=0.3))
    if rng.random() < 0.1:  # no relation word at all: "a red square and a blue circle"
        return f"{pa} and {pb}"
    rel = RELATION_WORDS[relation][rng.integers(len(RELATION_WORDS[relation]))]
    template = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
    return template.format(a=pa, rel=rel, b=pb)
