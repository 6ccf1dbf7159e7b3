"""The oracle reads ground-truth renders almost perfectly and stays usable on blurred, shifted ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle_app.data import COLORS, SHAPES, batch, heldout_prompts, render_prompt, sample
from dalle_app.data.dataset import Prompt, Target
from dalle_app.oracle import detect, recovers_scene, relation, satisfies


def _accuracy(samples, transform=lambda im: im) -> float:
    return float(np.mean([recovers_scene(transform(s.image), s.objects, s.relation) for s in samples]))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ground_truth_accuracy_at_least_98_percent(split):
    samples = batch(seed=20240 + len(split), n=250, split=split).samples
    assert _accuracy(samples) >= 0.98


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Like a VQGAN round trip: lost detail, soft edges, a color cast and noise."""
    im = Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR).resize((64, 64), Image.Resampling.BICUBIC)
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    out = np.asarray(im, np.float32) + rng.uniform(-15, 15, 3) + rng.normal(0, 5, (64, 64, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def test_robust_to_blur_and_color_shift():
    rng = np.random.default_rng(0)
    samples = batch(seed=77, n=150).samples
    assert _accuracy(samples, lambda im: _degrade(im, rng)) >= 0.9


def test_blank_and_noise_images_have_no_objects():
    assert detect(np.full((64, 64, 3), 240, np.uint8)) == []
    noise = np.clip(np.random.default_rng(1).normal(235, 6, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert detect(noise) == []


def test_satisfies_rejects_wrong_color_shape_size_and_relation():
    rng = np.random.default_rng(5)
    checked = 0
    while checked < 40:
        s = sample(rng, "train")
        targets = [Target(o.color, o.shape, o.size) for o in s.objects]
        assert satisfies(s.image, Prompt("", targets, s.relation, "x"))
        t = targets[0]
        other_color = next(c for c in COLORS if c not in {o.color for o in s.objects})
        other_shape = next(sh for sh in SHAPES if sh not in {o.shape for o in s.objects})
        other_size = "small" if t.size == "large" else "large"
        wrong = [
            Target(other_color, t.shape, t.size),
            Target(t.color, other_shape, t.size),
            Target(t.color, t.shape, other_size),
        ]
        for w in wrong:
            if not any(o.color == w.color and o.shape == w.shape and o.size == w.size for o in s.objects):
                assert not satisfies(s.image, Prompt("", [w, *targets[1:]], s.relation, "x"))
        if s.relation is not None:
            flipped = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
            assert not satisfies(s.image, Prompt("", targets, flipped[s.relation], "x"))
        checked += 1


def test_relation_reads_centers():
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = sample(rng, "heldout")
        if s.relation is not None:
            assert relation(*s.objects) == s.relation


def test_every_heldout_prompt_is_recognised_on_its_ground_truth_render():
    rng = np.random.default_rng(11)
    flipped = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    for prompt in heldout_prompts(60):
        truth = render_prompt(prompt, rng)
        assert satisfies(truth.image, prompt), prompt.text
        if prompt.relation is not None:
            assert not satisfies(truth.image, Prompt("", prompt.targets, flipped[prompt.relation], "relation"))


@pytest.mark.parametrize("pair", [("red", "pink"), ("orange", "yellow"), ("purple", "blue"), ("green", "cyan")])
def test_touching_objects_of_different_colors_are_split(pair):
    """Generated objects may touch: one blob of two colors side by side is two objects."""
    from dalle_app.data.shapes import render
    from dalle_app.data.world import ObjectSpec

    rng = np.random.default_rng(0)
    for shape_a, shape_b in (("square", "circle"), ("star", "cross")):
        a = ObjectSpec(pair[0], shape_a, "large", (18.0, 32.0))
        b = ObjectSpec(pair[1], shape_b, "large", (46.0, 32.0))  # boxes touch
        found = detect(render([a, b], [28, 28], rng))
        assert sorted((d.color, d.shape) for d in found) == sorted([(a.color, a.shape), (b.color, b.shape)])


def test_unknown_colors_are_reported_not_matched():
    """A gray object is found but has no palette color: it never satisfies a prompt."""
    from dalle_app.data.shapes import shape_mask

    image = np.full((64, 64, 3), 240.0)
    alpha = shape_mask("square", (32, 32), 28)[..., None]
    image = np.uint8(image * (1 - alpha) + 60.0 * alpha)
    (found,) = detect(image)
    assert found.color is None and found.shape == "square"
    assert not recovers_scene(image, [], None)
    assert not satisfies(image, Prompt("", [Target("blue", "square")], None, "single"))


def test_unreadable_images_have_no_objects():
    """Noise, dark or busy images (an untrained model's output) must not pass any prompt by chance."""
    rng = np.random.default_rng(2)
    colorful_noise = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    blocky = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).resize((64, 64)))
    dark = np.full((64, 64, 3), 40, np.uint8)
    for image in (colorful_noise, blocky, dark):
        assert detect(image) == []
