"""The evaluation harness judges correctly, and the shipped model stays above measured floors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dalle_app.data import heldout_prompts, render_prompt
from dalle_app.evaluate import (
    Judged,
    Verdict,
    clip_ranking,
    evaluate,
    main,
    roundtrip_figures,
    seen_prompts,
    truth_generator,
)
from dalle_app.hub import EMBEDDED_FOLDERS
from dalle_app.oracle import satisfies


def test_harness_scores_ground_truth_as_correct():
    prompts = heldout_prompts(6) + seen_prompts(4)
    figures = evaluate(6, 2, seed=0, n_seen_prompts=4, generator=truth_generator(prompts), ground_truth_samples=40)
    assert figures["oracle_ground_truth_accuracy"] >= 0.98
    for key in ("single_object_accuracy", "single_object_strict_accuracy", "relation_accuracy",
                "clip_top1_accuracy", "random_pick_accuracy", "seen_accuracy", "best_of_k_accuracy"):
        assert figures[key] == 1.0, key
    assert figures["variety"] > 0.05  # ground truth: each image placed and sized afresh
    assert figures["n_prompts"] == 6 and figures["n_single_prompts"] == 3 and figures["n_relation_prompts"] == 3


def test_harness_scores_wrong_images_as_wrong():
    """Images of another prompt (shifted by one) must not pass."""
    prompts = heldout_prompts(8)
    by_text = {p.text: p for p in prompts}
    texts = [p.text for p in prompts]

    def shifted(batch_texts, k, seed):
        rng = np.random.default_rng(seed)
        return [[(render_prompt(by_text[texts[(texts.index(t) + 2) % len(texts)]], rng).image, 0.0)] * k
                for t in batch_texts]

    figures = evaluate(8, 1, n_seen_prompts=0, generator=shifted, ground_truth_samples=10)
    assert figures["random_pick_accuracy"] == 0.0
    assert figures["seen_accuracy"] is None


def test_evaluation_seeds_draw_disjoint_images():
    """Image j of a pipeline call has the sampling seed (seed + j): the evaluations at seeds 0, 1
    and 2, held-out and training prompts alike, must not draw from overlapping seed ranges."""
    calls = []

    def recording(texts, k, seed):
        calls.append(range(seed, seed + len(texts) * k))
        rng = np.random.default_rng(seed)
        return [[(render_prompt(heldout_prompts(1)[0], rng).image, 0.0)] * k for _ in texts]

    for seed in (0, 1, 2):
        evaluate(8, 16, seed=seed, n_seen_prompts=8, generator=recording, ground_truth_samples=2)
    assert len(calls) == 6
    for i, a in enumerate(calls):
        for b in calls[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start, (a, b)


def test_single_objects_are_judged_by_size_apart_from_color_and_shape():
    """An image of the asked color and shape at the other size counts for color+shape only, and
    shows in the split by the size the prompt asked."""
    from dataclasses import replace

    from dalle_app.evaluate import judge, summarize

    prompts = {p.text: p for p in heldout_prompts(48) if p.kind == "single" and p.targets[0].size}
    other = {"small": "large", "large": "small"}

    def wrong_size(batch_texts, k, seed):
        rng = np.random.default_rng(seed)
        images = []
        for text in batch_texts:
            (target,) = prompts[text].targets
            drawn = replace(prompts[text], targets=[replace(target, size=other[target.size])])
            images.append([(render_prompt(drawn, rng).image, 0.0)] * k)
        return images

    figures = summarize(judge(list(prompts.values()), wrong_size, 2, seed=0), [])
    assert figures["single_object_strict_accuracy"] == 0.0
    assert figures["single_object_accuracy"] == 1.0  # colour and shape right
    assert figures["single_object_small_accuracy"] == figures["single_object_large_accuracy"] == 0.0
    assert figures["single_object_unsized_accuracy"] is None
    assert figures["variety"] == 0.0  # the same image twice per prompt


def test_saved_grid_frames_each_prompt_and_wraps_into_blocks(tmp_path):
    from PIL import Image

    prompts = heldout_prompts(20)
    path = tmp_path / "grid.png"
    evaluate(20, 2, n_seen_prompts=0, generator=truth_generator(prompts), ground_truth_samples=4, grid_path=str(path))
    grid = np.asarray(Image.open(path))
    assert grid.shape == (16 * 68, 2 * (2 * 68) + 12, 3)  # 16 rows, then a second block of 4
    assert tuple(grid[0, 0]) == (40, 170, 60)  # ground truth: framed green
    assert tuple(grid[4 * 68 + 1, 2 * 68 + 12 + 1]) == (255, 255, 255)  # below the short block: blank


def test_roundtrip_figures_measure_what_survives():
    identity = roundtrip_figures(lambda images: images, n=20)
    assert identity == {"vqgan_roundtrip_accuracy": 1.0, "vqgan_roundtrip_color_accuracy": 1.0,
                        "vqgan_roundtrip_shape_accuracy": 1.0}
    gray = roundtrip_figures(lambda images: images.mean(-1, keepdims=True).repeat(3, -1).astype(np.uint8), n=20)
    assert gray["vqgan_roundtrip_color_accuracy"] == 0.0 and gray["vqgan_roundtrip_accuracy"] == 0.0
    assert gray["vqgan_roundtrip_shape_accuracy"] > 0.5  # shapes survive the loss of color


def test_seen_prompts_are_training_combinations():
    from dalle_app.data import is_heldout_pair, is_heldout_triple

    for p in seen_prompts(30):
        assert not any(is_heldout_pair(t.color, t.shape) for t in p.targets)
        if p.relation:
            a, b = p.targets
            assert not is_heldout_triple((a.color, a.shape), p.relation, (b.color, b.shape))
        assert satisfies(render_prompt(p, np.random.default_rng(0)).image, p)


def _judged(correct: list[bool]) -> Judged:
    verdicts = [Verdict(ok, ok, ok, ok, ok) for ok in correct]
    return Judged(heldout_prompts(1)[0], verdicts, [float(-i) for i in range(len(correct))], [])


def test_clip_ranking_counts_right_images_ranked_above_wrong_ones():
    judged = [_judged([True, False, True, False]), _judged([True, True]), _judged([False, True, True])]
    figures = clip_ranking(judged)
    # pairs (right, wrong): 2 x 2 in the first prompt, of which 2 + 1 ordered right; none in the
    # second; 2 x 1 in the third, none ordered right
    assert figures["clip_ordering_accuracy"] == pytest.approx(3 / 6)
    gains = [1 - 0.5, 1 - 1.0, 0 - 2 / 3]
    assert figures["clip_pick_gain"] == pytest.approx(np.mean(gains))
    assert figures["clip_pick_gain_stderr"] == pytest.approx(np.std(gains, ddof=1) / np.sqrt(3))


def test_several_seeds_pool_their_prompts(capsys):
    assert main(["--json", "--generator", "truth", "--n-prompts", "4", "--images-per-prompt", "2",
                 "--n-seen-prompts", "2", "--seed", "0", "1"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["seed"] == [0, 1]
    assert figures["n_prompts"] == 8 and figures["n_seen_prompts"] == 4
    assert figures["random_pick_accuracy"] == 1.0 and figures["clip_pick_gain"] == 0.0
    assert figures["clip_ordering_accuracy"] is None  # no wrong image to rank


def test_cli_prints_json_last(capsys):
    assert main(["--json", "--generator", "truth", "--n-prompts", "2", "--images-per-prompt", "1",
                 "--n-seen-prompts", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    for key in ("oracle_ground_truth_accuracy", "single_object_accuracy", "relation_accuracy",
                "clip_top1_accuracy", "random_pick_accuracy", "n_prompts"):
        assert key in figures


ASSETS_MISSING = [str(p) for p in EMBEDDED_FOLDERS.values() if not p.is_dir()]


@pytest.mark.slow
@pytest.mark.skipif(bool(ASSETS_MISSING), reason=f"embedded model assets missing: {ASSETS_MISSING}")
def test_shipped_model_above_measured_floors():
    figures = evaluate(n_prompts=24, images_per_prompt=4, seed=0, n_seen_prompts=16, ground_truth_samples=40)
    assert figures["oracle_ground_truth_accuracy"] >= 0.98
    for key, floor in SHIPPED_FLOORS.items():
        assert figures[key] >= floor, (key, figures[key], floor, figures)
    # CLIP's pick clearly better than any one image (measured: 1.0 against 0.885)
    assert figures["clip_top1_accuracy"] >= figures["random_pick_accuracy"] + 0.05, figures


# Floors below the figures measured with this exact call on the shipped assets, with the sampling
# settings their generation_config.json recommends (single object, color+shape 0.94, with size 0.92,
# relation 0.85, colour 0.97, shape 0.94, random pick 0.885, CLIP's pick 1.0, CLIP ordering a right
# image above a wrong one 0.96, prompts of training combinations 0.95, VQGAN round trip 1.0, variety
# 0.12 against 0.15 for ground truth); a regression of the model, the sampler, CLIP or the oracle
# drops under them (variety: a sampler that draws one image over and over).
SHIPPED_FLOORS: dict[str, float] = {
    "vqgan_roundtrip_accuracy": 0.95,
    "single_object_accuracy": 0.8,
    "single_object_strict_accuracy": 0.75,
    "relation_accuracy": 0.75,
    "color_accuracy": 0.9,
    "shape_accuracy": 0.8,
    "random_pick_accuracy": 0.75,
    "clip_top1_accuracy": 0.9,
    "clip_ordering_accuracy": 0.85,
    "seen_accuracy": 0.8,
    "variety": 0.08,
}


@pytest.mark.skipif(bool(ASSETS_MISSING), reason=f"embedded model assets missing: {ASSETS_MISSING}")
def test_shipped_vqgan_codes_are_local():
    """The shipped encoder mostly gives one colour one code (measured 0.61 on 256 held-out scenes;
    0.39 before the locality loss)."""
    from dalle_app.data import batch
    from dalle_app.models.vqgan import load_vqgan
    from dalle_app.train.codes import code_consistency

    vq = load_vqgan(EMBEDDED_FOLDERS["vqgan"])
    images = batch(seed=5, n=32, split="heldout").images.astype(np.float32) / 255.0
    codes = np.asarray(vq.encode(images)[0])
    assert code_consistency(images, codes, vq.config.downsampling) > 0.5
