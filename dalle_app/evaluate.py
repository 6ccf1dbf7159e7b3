"""How well the embedded model draws what it is asked: held-out prompts judged by the oracle.

`python -m dalle_app.evaluate --json` generates ``--images-per-prompt`` images for each of
``--n-prompts`` held-out prompts (dalle_app.data.heldout_prompts: one-object prompts of held-out
(color, shape) pairs and two-object prompts of held-out relation triples) with the shipped model
(``DallePipeline.from_pretrained()``), lets the oracle judge every image and prints, as its last
line, one JSON object.

``--split`` picks the prompts: ``test`` (the default) for the figures reported for a shipped
model, ``validation`` for every recipe choice (training steps, sampling settings...), so the
test prompts never steer the recipe (dalle_app.data.world describes both splits).

The oracle judges strictly (dalle_app.oracle): an image is right only when it holds exactly the
asked objects, nothing else, in the asked relation with a clear margin. Figures (all in [0, 1]):

* ``oracle_ground_truth_accuracy``: the oracle reading exact scenes (objects, sizes, relation)
  on fresh ground-truth renders of the split; the figures below are only as good as this one.
* ``single_object_accuracy``: one-object prompts, share of *all* generated images that show
  exactly one object, of the asked color and shape (size not judged).
  ``single_object_top1_accuracy``: the same for the CLIP-best image of each prompt only.
  ``single_object_sized_accuracy``: the same, and the size too when the prompt asks one.
  ``single_object_{unsized,small,large}_accuracy``: the sized figure split by the size the
  prompt asks (none, small, large).
* ``relation_accuracy`` / ``relation_top1_accuracy``: two-object prompts, exactly the two asked
  objects and in the asked relation; all images / CLIP-best image.
* ``relation_objects_accuracy``: two-object prompts, both objects present, relation and other
  objects ignored.
* ``extra_object_rate``: all prompts, share of images with more objects than the prompt asks.
* ``lenient_single_object_accuracy`` / ``lenient_relation_accuracy``: the two accuracies as the
  lenient oracle judges them (other objects tolerated, relation without margin).
* ``clip_top1_accuracy``: all prompts, the CLIP-best image is correct.
* ``random_pick_accuracy``: all prompts, mean over every image (what a random pick gets).
* ``best_of_k_accuracy``: all prompts, at least one image is correct (CLIP's ceiling).
* ``clip_pick_gain`` / ``clip_pick_gain_stderr``: per prompt, CLIP's pick (1 or 0) less the share
  of its images that are right, averaged, and that mean's standard error: how far CLIP's pick is
  above a random one, and whether the gap is more than noise (gain over twice its error).
* ``clip_ordering_accuracy``: over every prompt's (right image, wrong image) pairs, the share
  CLIP ranks right first (the area under its ROC curve, per prompt, pooled). A pick is one
  maximum over the batch and moves a lot between seeds; the ordering moves much less.
* ``color_accuracy`` / ``shape_accuracy``: all prompts, all images, every asked color / shape
  is on some object (partial credit: where a model fails).
* ``variety``: how different one prompt's images are from each other (``variety``'s docstring);
  accuracy bought with a low temperature shows here as a fall.
* ``vqgan_roundtrip_accuracy`` (``_color_`` / ``_shape_``): ground-truth held-out renders encoded
  by the model's VQGAN to the codes DalleBart is trained on (one per color of the scene) and
  decoded, judged against their own scene: the ceiling of the figures above, given the VQGAN
  (model runs only).
* ``completion_accuracy``, ``seamless_seam_ratio`` and their companions: image completion and
  tileable pictures (dalle_app.evaluate_completion; model runs only).
* ``seen_accuracy`` (``_top1_``, ``_color_``, ``_shape_``): the same judgements on
  ``--n-seen-prompts`` prompts built from combinations training does show (how well the model
  learned its world at all).

``--seed`` takes several seeds: their prompts are pooled into one set of figures (the
ground-truth figures are their mean).

``--generator truth`` swaps the model for ground-truth renders with random scores: a check of the
harness itself (accuracies near 1, CLIP-top-1 equal to random pick), needing no model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from dalle_app.data import Prompt, Sample, Split, Target, batch, heldout_prompts, render_prompt, triple_split
from dalle_app.data.captions import with_article
from dalle_app.data.world import RELATIONS, training_pairs
from dalle_app.evaluate_completion import pipeline_figures
from dalle_app.oracle import detect, matches, recovers_scene, shows

# A generator maps prompt texts to, per prompt, (image uint8 (H, W, 3), score) ranked best first.
Generator = Callable[[list[str], int, int], list[list[tuple[np.ndarray, float]]]]

GROUND_TRUTH_SAMPLES = 200
DATA_SPLITS: dict[str, Split] = {"test": "heldout", "validation": "validation"}  # --split -> dalle_app.data


@dataclass(frozen=True)
class Verdict:
    """The oracle on one image for one prompt: fully right, and which parts are right."""

    correct: bool  # shows the prompt, strictly (oracle.shows)
    pairs: bool  # the same with the sizes left free
    extra: bool  # more objects than the prompt asks
    lenient: bool  # shows the prompt as the lenient oracle judges it
    lenient_pairs: bool  # every asked (color, shape) on some object, size, relation and others ignored
    objects: bool  # every asked object present (color, shape, size), relation and others ignored
    colors: bool  # every asked color present on some object
    shapes: bool  # every asked shape present on some object


def verdict(image: np.ndarray, prompt: Prompt) -> Verdict:
    found = detect(image)
    unsized = replace(prompt, targets=[replace(t, size=None) for t in prompt.targets])
    return Verdict(
        correct=shows(found, prompt),
        pairs=shows(found, unsized),
        extra=len(found) > len(prompt.targets),
        lenient=shows(found, prompt, lenient=True),
        lenient_pairs=all(any(d.color == t.color and d.shape == t.shape for d in found) for t in prompt.targets),
        objects=all(any(matches(d, t) for d in found) for t in prompt.targets),
        colors=all(any(d.color == t.color for d in found) for t in prompt.targets),
        shapes=all(any(d.shape == t.shape for d in found) for t in prompt.targets),
    )


@dataclass(frozen=True)
class Judged:
    """The oracle's verdicts on one prompt's images, in ranking order (best CLIP score first)."""

    prompt: Prompt
    verdicts: list[Verdict]
    scores: list[float]
    images: list[np.ndarray]

    @property
    def correct(self) -> list[bool]:
        return [v.correct for v in self.verdicts]


class PipelineGenerator:
    """The shipped embedded model: DallePipeline.from_pretrained() sampling with the settings its
    folder recommends (what the app uses by default), overridden by ``settings``.

    ``models`` may name other folders ({"dalle": ..., "vqgan": ..., "clip": ...}), e.g. a training
    run's exports, to evaluate them before they are shipped.
    """

    def __init__(self, models: dict[str, str] | None = None, **settings: float) -> None:
        from dalle_app.hub import recommended_settings
        from dalle_app.pipeline import DallePipeline  # imports JAX: only when a model is asked for

        models = models or {}
        self.pipe = DallePipeline.from_pretrained(**models)
        self.settings = {**recommended_settings(models.get("dalle")), **settings}

    def __call__(self, texts: list[str], num_images: int, seed: int) -> list[list[tuple[np.ndarray, float]]]:
        output = self.pipe(texts, num_images=num_images, seed=seed, **self.settings)
        return [[(np.asarray(g.image.convert("RGB")), g.score) for g in ranked] for ranked in output.images]

    def roundtrip(self, images: np.ndarray) -> np.ndarray:
        """Images encoded to codes and decoded by the model's VQGAN: the best the model can draw."""
        return vqgan_roundtrip(self.pipe.vqgan, images)


def vqgan_roundtrip(vqgan: object, images: np.ndarray, chunk: int = 8) -> np.ndarray:
    """uint8 (N, H, W, 3) → the same images after VQGAN encode, one code per color (what DalleBart
    is trained on) and decode, uint8."""
    from dalle_app.models.vqgan import to_uint8
    from dalle_app.train.codes import color_consistent_codes

    side = vqgan.config.downsampling
    out = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].astype(np.float32) / 255.0
        padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), np.float32)])
        codes = color_consistent_codes(padded, np.asarray(vqgan.encode(padded)[0]), side)
        out.append(np.asarray(to_uint8(vqgan.decode(codes)))[: len(part)])
    return np.concatenate(out)


def truth_generator(prompts: Sequence[Prompt]) -> Generator:
    """Ground-truth renders of the prompts with random scores: a model-free check of the harness."""
    by_text = {p.text: p for p in prompts}

    def generate(texts: list[str], num_images: int, seed: int) -> list[list[tuple[np.ndarray, float]]]:
        rng = np.random.default_rng(seed)
        return [
            [(render_prompt(by_text[t], rng).image, float(rng.random())) for _ in range(num_images)]
            for t in texts
        ]

    return generate


def seen_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts of combinations training shows, alternating one object and a relation."""
    rng = np.random.default_rng(seed)
    pairs = training_pairs()
    out: list[Prompt] = []
    while len(out) < n:
        if len(out) % 2 == 0:
            color, shape = pairs[rng.integers(len(pairs))]
            out.append(Prompt(with_article(f"{color} {shape}"), [Target(color, shape)], None, "single"))
            continue
        i, j = rng.choice(len(pairs), 2, replace=False)
        (ca, sa), (cb, sb), relation = pairs[i], pairs[j], RELATIONS[rng.integers(len(RELATIONS))]
        if triple_split((ca, sa), relation, (cb, sb)) != "train":
            continue
        text = f"{with_article(f'{ca} {sa}')} {relation} {with_article(f'{cb} {sb}')}"
        out.append(Prompt(text, [Target(ca, sa), Target(cb, sb)], relation, "relation"))
    return out


def sampling_seed(seed: int, part: str) -> int:
    """The generator's seed for one part ("heldout", "validation", "seen") of the evaluation at `seed`.

    The pipeline gives image j of a call the seed (seed + j), so the calls of nearby evaluation
    seeds must not start at nearby sampling seeds: with seed and seed + 1 they would share all
    but one image of each prompt. A hash keeps every (seed, part) apart.
    """
    return int.from_bytes(hashlib.sha256(f"{part}-{seed}".encode()).digest()[:4], "big") % 2**31


def judge(prompts: Sequence[Prompt], generate: Generator, images_per_prompt: int, seed: int) -> list[Judged]:
    generated = generate([p.text for p in prompts], images_per_prompt, seed)
    return [
        Judged(prompt, [verdict(image, prompt) for image, _ in ranked], [s for _, s in ranked], [im for im, _ in ranked])
        for prompt, ranked in zip(prompts, generated)
    ]


def scene_prompt(sample: Sample) -> Prompt:
    """The prompt a sample's scene answers exactly: its objects with their sizes, its relation."""
    targets = [Target(o.color, o.shape, o.size) for o in sample.objects]
    return Prompt(sample.caption, targets, sample.relation, "single" if sample.relation is None else "relation")


def oracle_ground_truth_accuracy(n: int = GROUND_TRUTH_SAMPLES, seed: int = 0, split: Split = "heldout") -> float:
    """Exact scene recovery (objects, sizes, positions, relation) on fresh ground-truth renders of ``split``."""
    truth = batch(seed=10_000 + seed, n=n, split=split)
    return float(np.mean([recovers_scene(s.image, s.objects, s.relation) for s in truth.samples]))


def roundtrip_figures(roundtrip: Callable[[np.ndarray], np.ndarray], n: int = GROUND_TRUTH_SAMPLES,
                      seed: int = 0, split: Split = "heldout") -> dict[str, float]:
    """Ground-truth renders of ``split`` passed through the VQGAN, judged against their own scene."""
    truth = batch(seed=10_000 + seed, n=n, split=split)
    verdicts = [verdict(image, scene_prompt(s)) for image, s in zip(roundtrip(truth.images), truth.samples)]
    return {
        "vqgan_roundtrip_accuracy": float(np.mean([v.correct for v in verdicts])),
        "vqgan_roundtrip_color_accuracy": float(np.mean([v.colors for v in verdicts])),
        "vqgan_roundtrip_shape_accuracy": float(np.mean([v.shapes for v in verdicts])),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def variety(js: list[Judged], threshold: int = 48) -> float | None:
    """Share of pixels that differ (some channel by more than ``threshold``) between two images of
    one prompt, averaged over every such pair of every prompt: 0 when each prompt's images are all
    alike. Ground truth (``--generator truth``) gives the world's own variety to compare with."""
    shares = []
    for j in js:
        images = [im.astype(np.int16) for im in j.images]
        shares += [float(np.mean(np.abs(a - b).max(-1) > threshold))
                   for i, a in enumerate(images) for b in images[i + 1:]]
    return _mean(shares)


def clip_ranking(judged: list[Judged]) -> dict[str, float | None]:
    """CLIP's pick against a random one, per prompt, and how often it ranks a right image above a
    wrong one (the module docstring's ``clip_pick_gain`` and ``clip_ordering_accuracy``)."""
    gains = [float(j.correct[0]) - float(np.mean(j.correct)) for j in judged]
    ordered = pairs = 0
    for j in judged:
        wrong_after = np.cumsum([not ok for ok in j.correct][::-1])[::-1]  # wrong images at or below each rank
        ordered += int(sum(w for ok, w in zip(j.correct, wrong_after) if ok))
        pairs += sum(j.correct) * (len(j.correct) - sum(j.correct))
    return {
        "clip_pick_gain": _mean(gains),
        "clip_pick_gain_stderr": float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else None,
        "clip_ordering_accuracy": ordered / pairs if pairs else None,
    }


def summarize(judged: list[Judged], seen: list[Judged]) -> dict[str, float | int | None]:
    single = [j for j in judged if j.prompt.kind == "single"]
    relation = [j for j in judged if j.prompt.kind == "relation"]

    def every(js: list[Judged], part: str = "correct") -> float | None:
        return _mean([getattr(v, part) for j in js for v in j.verdicts])

    def top1(js: list[Judged], part: str = "correct") -> float | None:
        return _mean([getattr(j.verdicts[0], part) for j in js])

    return {
        "n_prompts": len(judged),
        "n_single_prompts": len(single),
        "n_relation_prompts": len(relation),
        "single_object_accuracy": every(single, "pairs"),
        "single_object_top1_accuracy": top1(single, "pairs"),
        "single_object_sized_accuracy": every(single),
        **{f"single_object_{name}_accuracy": every([j for j in single if j.prompt.targets[0].size == size])
           for name, size in (("unsized", None), ("small", "small"), ("large", "large"))},
        "relation_accuracy": every(relation),
        "relation_top1_accuracy": top1(relation),
        "relation_objects_accuracy": every(relation, "objects"),
        "extra_object_rate": every(judged, "extra"),
        "lenient_single_object_accuracy": every(single, "lenient_pairs"),
        "lenient_relation_accuracy": every(relation, "lenient"),
        "clip_top1_accuracy": top1(judged),
        "random_pick_accuracy": every(judged),
        "best_of_k_accuracy": _mean([any(j.correct) for j in judged]),
        **clip_ranking(judged),
        "color_accuracy": every(judged, "colors"),
        "shape_accuracy": every(judged, "shapes"),
        "variety": variety(judged),
        "n_seen_prompts": len(seen),
        "seen_accuracy": every(seen),
        "seen_top1_accuracy": top1(seen),
        "seen_color_accuracy": every(seen, "colors"),
        "seen_shape_accuracy": every(seen, "shapes"),
    }


def evaluate(
    n_prompts: int = 48,
    images_per_prompt: int = 16,
    seed: int | Sequence[int] = 0,
    n_seen_prompts: int = 16,
    generator: Generator | None = None,
    ground_truth_samples: int = GROUND_TRUTH_SAMPLES,
    grid_path: str | None = None,
    split: str = "test",
) -> dict[str, float | int | str | list[int] | None]:
    """All figures of the module docstring on ``split``'s prompts ("test" or "validation");
    ``generator`` None means the shipped model. Several seeds pool their prompts into one set of
    figures.

    ``grid_path``: also save the held-out prompts' images there as a PNG grid (see save_grid).
    """
    started = time.perf_counter()
    if split not in DATA_SPLITS:
        raise ValueError(f"split must be one of {sorted(DATA_SPLITS)}, got {split!r}")
    data_split = DATA_SPLITS[split]
    seeds = [seed] if isinstance(seed, int) else list(seed)
    generate = generator if generator is not None else PipelineGenerator()
    judged: list[Judged] = []
    seen_judged: list[Judged] = []
    truth: list[dict[str, float]] = []
    for s in seeds:
        prompts = heldout_prompts(n_prompts, seed=s, split=data_split)
        seen = seen_prompts(n_seen_prompts, seed=s)
        judged += judge(prompts, generate, images_per_prompt, sampling_seed(s, data_split)) if prompts else []
        seen_judged += judge(seen, generate, images_per_prompt, sampling_seed(s, "seen")) if seen else []
        truth.append({
            "oracle_ground_truth_accuracy": oracle_ground_truth_accuracy(ground_truth_samples, s, data_split),
            **(roundtrip_figures(generate.roundtrip, ground_truth_samples, s, data_split)
               if isinstance(generate, PipelineGenerator) else {}),
            **(pipeline_figures(generate.pipe, generate.settings, s)
               if isinstance(generate, PipelineGenerator) else {}),
        })
    if grid_path and judged:
        save_grid(judged, grid_path)
    figures = {
        **{key: float(np.mean([t[key] for t in truth])) for key in truth[0]},
        **summarize(judged, seen_judged),
        "split": split,
        "images_per_prompt": images_per_prompt,
        "seed": seeds[0] if len(seeds) == 1 else seeds,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return figures


def save_grid(judged: list[Judged], path: str, rows_per_block: int = 16) -> None:
    """One row per prompt, its images best-ranked first, framed green (correct) or red (wrong);
    past ``rows_per_block`` prompts the rows continue in a new block to the right."""
    from PIL import Image

    cell, gap = 68, 12
    columns = max(len(j.images) for j in judged)
    blocks = -(-len(judged) // rows_per_block)
    width = blocks * cell * columns + (blocks - 1) * gap
    grid = np.full((cell * min(len(judged), rows_per_block), width, 3), 255, np.uint8)
    for index, j in enumerate(judged):
        row, left = index % rows_per_block, (index // rows_per_block) * (cell * columns + gap)
        for col, (image, ok) in enumerate(zip(j.images, j.correct)):
            framed = np.empty((cell, cell, 3), np.uint8)
            framed[:] = (40, 170, 60) if ok else (210, 40, 40)
            framed[2:-2, 2:-2] = np.asarray(Image.fromarray(image).resize((cell - 4, cell - 4)))
            grid[row * cell : (row + 1) * cell, left + col * cell : left + (col + 1) * cell] = framed
    Image.fromarray(grid).save(path)


def _table(figures: dict) -> str:
    return "\n".join(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}" for k, v in figures.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_app.evaluate",
        description="Judge the embedded model on held-out prompts with the oracle.",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    parser.add_argument("--split", choices=sorted(DATA_SPLITS), default="test",
                        help="whose prompts: 'validation' for recipe choices, 'test' (default) for the figures "
                             "reported once per shipped model")
    parser.add_argument("--n-prompts", type=int, default=48,
                        help="held-out prompts, alternating one-object and relations (test, 48: every pair of the "
                             "split with no, small and large size, and 24 relations)")
    parser.add_argument("--images-per-prompt", type=int, default=16,
                        help="images generated per prompt (16: 384 one-object images, which move by ~0.02 "
                             "between seeds)")
    parser.add_argument("--n-seen-prompts", type=int, default=16, help="prompts of training combinations")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="fixes the prompts' order and the sampling; several seeds pool their prompts")
    parser.add_argument("--top-k", type=int, default=None, help="sampling top-k (default: the pipeline's)")
    parser.add_argument("--top-p", type=float, default=None, help="sampling top-p (default: the pipeline's)")
    parser.add_argument("--cond-scale", type=float, default=None, help="super-conditioning scale (default: the pipeline's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the pipeline's)")
    for kind in ("dalle", "vqgan", "clip"):
        parser.add_argument(f"--{kind}", default=None, metavar="FOLDER",
                            help=f"{kind} model folder instead of the embedded one (e.g. a training run's export)")
    parser.add_argument("--save-grid", metavar="PNG", default=None,
                        help="save the held-out images (rows: prompts; frames: green correct, red wrong)")
    parser.add_argument("--generator", choices=["model", "truth"], default="model",
                        help="'truth' renders ground truth instead of sampling: checks the harness")
    args = parser.parse_args(argv)
    if args.n_prompts < 0 or args.n_seen_prompts < 0 or args.images_per_prompt < 1:
        parser.error("--n-prompts and --n-seen-prompts must be >= 0, --images-per-prompt >= 1")

    started = time.perf_counter()
    if args.generator == "truth":
        split = DATA_SPLITS[args.split]
        generator = truth_generator([p for s in args.seed for p in heldout_prompts(args.n_prompts, s, split)
                                     + seen_prompts(args.n_seen_prompts, s)])
    else:
        asked = (("top_k", args.top_k), ("top_p", args.top_p), ("cond_scale", args.cond_scale),
                 ("temperature", args.temperature))
        settings = {k: v for k, v in asked if v is not None}
        models = {k: getattr(args, k) for k in ("dalle", "vqgan", "clip") if getattr(args, k)}
        generator = PipelineGenerator(models, **settings)
    figures = evaluate(args.n_prompts, args.images_per_prompt, args.seed, args.n_seen_prompts, generator,
                       grid_path=args.save_grid, split=args.split)
    figures["generator"] = args.generator
    figures["total_s"] = round(time.perf_counter() - started, 2)  # model loading included
    if args.json:
        print(json.dumps(figures))
    else:
        print(_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
