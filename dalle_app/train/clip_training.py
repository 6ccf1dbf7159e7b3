"""CLIP training: contrastive on (image, caption) pairs, with hard negatives on both sides.

CLIP's job in the app is to rank images generated for *one* prompt, so what it must tell apart
is "a red square above a blue circle" from the same objects the other way round, or a red square
from an orange one. Plain in-batch negatives rarely test that, so every image also gets a caption
that is wrong in exactly one way (objects swapped or one shape changed for two-object scenes;
another color or shape for one-object scenes), added as an extra text in the image→text
softmax. And every caption gets a near-miss image, its scene wrong in one way (`near_miss`:
another shape, the asked size changed, the relation reversed), added as an extra image in the
text→image softmax: that is the choice the app's ranking makes, between images of one prompt
that differ in a detail. Captions equal to the positive (the generator repeats some) share the
target mass instead of counting as negatives. Wrong captions and near misses keep to training
combinations: CLIP never sees a held-out pair or triple, not even as a negative.

That leaves held-out pairs to the image tower's way of combining colour and shape: trained on
pairs alone, it can put an unseen "red diamond" next to red circles, where no caption of a
diamond points. So each step also renders quadruples of training pairs that cross two colours
with two shapes on one background (`analogy_quads`), and asks their embeddings to form a
parallelogram, red star − red circle = green star − green circle: colour and shape then add up,
and so they do for pairs the tower never saw.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_app.data import COLORS, SHAPES, SIZES, ObjectSpec, Prompt, Sample, Target, is_heldout_scene, render_prompt
from dalle_app.data import batch as data_batch
from dalle_app.data import captions as caption_text
from dalle_app.data.captions import SIZE_WORDS
from dalle_app.data.shapes import render
from dalle_app.data.world import CELL, GRID, INVERSE, PLACE, training_pairs
from dalle_app.hardware import compiler_options
from dalle_app.models.clip import (
    CLIPConfig,
    CLIPModule,
    CLIPTextConfig,
    CLIPVisionConfig,
    build_clip,
    init_params,
    logits_from_embeds,
    save_clip,
)
from dalle_app.model_files import TOKENIZER_FILES
from dalle_app.models.clip_preprocess import CLIPImagePreprocessor, load_clip_tokenizer
from dalle_app.train.common import (
    OptimConfig,
    PhaseLog,
    Prefetcher,
    make_optimizer,
    phase_seed,
    run_loop,
    remaining,
    start_state,
    write_json,
)

PHASE = "clip"
MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clamps the learned temperature at 100


def model_config(vocab_size: int, image_size: int = 64, width: int = 128, layers: int = 3,
                 text_length: int = 32, projection: int = 128) -> CLIPConfig:
    """Small ViT (patch 8) and text transformer; ids as our CLIP tokenizer assigns them
    (<|startoftext|>=0, <|endoftext|>=1 also padding), pooling at the first <|endoftext|>."""
    heads = max(1, width // 32)
    return CLIPConfig(
        text=CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=text_length, pad_token_id=1, bos_token_id=0, eos_token_id=1),
        vision=CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=image_size, patch_size=8),
        projection_dim=projection,
    )


@dataclasses.dataclass(frozen=True)
class CLIPTrainConfig:
    steps: int | None = 300  # None: as many as fit in `seconds`
    seconds: float | None = None
    batch_size: int = 96
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.05
    save_every: int = 100
    log_every: int = 20
    width: int = 128
    layers: int = 3
    eval_images: int = 256
    analogies: int = 0  # colour/shape quadruples per step (`analogy_quads`)
    analogy_weight: float = 1.0  # weight of their parallelogram loss


def wrong_caption(sample: Sample, rng: np.random.Generator) -> str:
    """A caption false for this scene in one respect, naming training combinations only: for two
    objects, the objects swapped or one object's shape changed; for one object, another colour or
    shape."""
    while True:
        if sample.relation is not None:
            objects, relation = list(sample.objects), sample.relation
            a, b = objects
            if rng.random() < 0.5 and (a.color, a.shape) != (b.color, b.shape):  # twins swapped stay true
                objects.reverse()
            else:
                i = int(rng.integers(2))
                objects[i] = dataclasses.replace(objects[i], shape=str(rng.choice(
                    [x for x in SHAPES if x != objects[i].shape])))
            wrong = caption_text.pair_caption(objects[0], relation, objects[1], rng)
            if objects[0] == b and " and " in wrong:
                continue  # "A and B" (no relation word) is true either way round
        else:
            obj, relation = sample.objects[0], None
            if rng.random() < 0.5:
                objects = [dataclasses.replace(obj, color=str(rng.choice([c for c in COLORS if c != obj.color])))]
            else:
                objects = [dataclasses.replace(obj, shape=str(rng.choice([x for x in SHAPES if x != obj.shape])))]
            wrong = caption_text.single_caption(objects[0], rng)
        if not is_heldout_scene(objects, relation):
            return wrong


def near_miss(sample: Sample, rng: np.random.Generator) -> np.ndarray:
    """A fresh render of a training sample's scene, wrong in one respect its caption states:
    another shape for one object, the other size when the caption names a size (one object), or
    the relation reversed when the caption names one (two objects). Only training combinations
    are drawn."""
    words = sample.caption.split()
    sized = any(word in words for options in SIZE_WORDS.values() for word in options)
    targets = [Target(o.color, o.shape, o.size) for o in sample.objects]
    while True:
        changed, relation = list(targets), sample.relation
        choice = rng.random()
        if relation is not None and "and" not in words and choice < 0.5:
            relation = INVERSE[relation]
        elif relation is None and sized and choice < 1 / 3:
            t = targets[0]
            changed[0] = Target(t.color, t.shape, next(size for size in SIZES if size != t.size))
        else:
            i = int(rng.integers(len(targets)))
            changed[i] = Target(targets[i].color, str(rng.choice([s for s in SHAPES if s != targets[i].shape])),
                                targets[i].size)
        if not is_heldout_scene([ObjectSpec(t.color, t.shape, t.size, (0, 0)) for t in changed], relation):
            break
    prompt = Prompt("", changed, relation, "single" if relation is None else "relation")
    return render_prompt(prompt, rng).image


def analogy_quads(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` quadruples of one-object images (4n, H, W, 3): colours c1, c2 × shapes s1, s2, all four
    training pairs, ordered (c1 s1, c1 s2, c2 s1, c2 s2), one size, place and background each.

    CLIP's image tower only ever sees the training pairs; when its embedding is a sum of a colour
    part and a shape part, an unseen pair lands where its caption points. The parallelogram loss on
    these quadruples (`analogy_residual`) asks for that sum.
    """
    pairs = set(training_pairs())
    out = []
    while len(out) < 4 * n:
        c1, c2 = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
        s1, s2 = (str(x) for x in rng.choice(list(SHAPES), 2, replace=False))
        if not {(c1, s1), (c1, s2), (c2, s1), (c2, s2)} <= pairs:
            continue
        size = str(rng.choice(list(SIZES)))
        side = SIZES[size]
        x, y = (int(v) for v in rng.choice(np.arange(0, GRID - side // CELL + 1, PLACE), 2))
        center = (CELL * x + side / 2, CELL * y + side / 2)
        state = rng.bit_generator.state
        for c, shape in ((c1, s1), (c1, s2), (c2, s1), (c2, s2)):
            r = np.random.default_rng()
            r.bit_generator.state = state
            out.append(render([ObjectSpec(c, shape, size, center)], [side], r))
        rng.random()
    return np.stack(out)


def render_batch(seed: int, step: int, n: int, split: str,
                 analogies: int = 0) -> tuple[np.ndarray, list[str], list[str], np.ndarray, np.ndarray]:
    """Step `step`'s scenes: images, their captions, one wrong caption each, one near-miss image
    each and `analogies` quadruples (training split only)."""
    b = data_batch(phase_seed(seed, f"{PHASE}-{split}", step), n, split)
    rng = np.random.default_rng(phase_seed(seed, f"{PHASE}-negatives-{split}", step))
    wrong = [wrong_caption(s, rng) for s in b.samples]
    misses = np.stack([near_miss(s, rng) for s in b.samples]) if split == "train" else b.images[:0]
    quads = analogy_quads(analogies, rng) if split == "train" and analogies else b.images[:0]
    return b.images, list(b.captions), wrong, misses, quads


def model_inputs(rendered: tuple[np.ndarray, list[str], list[str], np.ndarray, np.ndarray],
                 preprocess: CLIPImagePreprocessor, tokenize) -> dict[str, Any]:
    """Images, near misses then quadruples preprocessed exactly as the app does, positive then
    wrong captions tokenized."""
    images, captions, negatives, misses, quads = rendered
    ids, mask = tokenize(captions + negatives)
    same = np.array([[x == y for y in captions] for x in captions], np.float32)
    return {"pixels": jnp.asarray(preprocess(np.concatenate([images, misses, quads]))), "input_ids": jnp.asarray(ids),
            "attention_mask": jnp.asarray(mask), "same": jnp.asarray(same),
            "quads": jnp.zeros((len(quads) // 4, 0))}  # only its length is read: how many quadruples


def loss_and_metrics(module: CLIPModule, params: Any, batch: dict[str, Any],
                     analogy_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric soft-target contrastive loss; image→text includes the wrong captions as negatives,
    text→image the near-miss images (the pixels after the first n, when the batch has them); plus
    `analogy_weight` × the quadruples' parallelogram residual (the last 4q pixels)."""
    images, text, scale = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                       batch["pixels"])
    n, q = batch["same"].shape[0], batch["quads"].shape[0]
    images, quads = images[:images.shape[0] - 4 * q], images[images.shape[0] - 4 * q:].reshape(q, 4, images.shape[-1])
    image, misses = images[:n], images[n:]
    scale = jnp.minimum(scale, MAX_LOGIT_SCALE)
    targets = batch["same"] / batch["same"].sum(axis=1, keepdims=True)
    per_image = logits_from_embeds(image, text, scale)  # (n, 2n): positives then wrong captions
    image_targets = jnp.concatenate([targets, jnp.zeros_like(targets)], axis=1)
    loss_i = optax.softmax_cross_entropy(per_image, image_targets).mean()
    per_text = logits_from_embeds(text[:n], images, scale)  # (n, n + misses): positives then near misses
    text_targets = jnp.concatenate([targets.T, jnp.zeros((n, misses.shape[0]))], axis=1)
    loss_t = optax.softmax_cross_entropy(per_text, text_targets / text_targets.sum(1, keepdims=True)).mean()
    diag = jnp.diagonal(per_image[:, :n])
    metrics = {
        "loss": (loss_i + loss_t) / 2,
        "retrieval": jnp.mean(batch["same"][jnp.arange(n), jnp.argmax(per_image[:, :n], axis=1)]),
        "beats_wrong_caption": jnp.mean(diag > jnp.diagonal(per_image[:, n:])),
        "logit_scale": jnp.exp(scale),
    }
    if misses.shape[0]:
        metrics["beats_near_miss"] = jnp.mean(diag > jnp.diagonal(per_text[:, n:]))
    loss = metrics["loss"]
    if q:
        residual = quads[:, 0] - quads[:, 1] - quads[:, 2] + quads[:, 3]
        metrics["analogy_residual"] = jnp.mean(jnp.sum(residual ** 2, axis=-1))
        loss = loss + analogy_weight * metrics["analogy_residual"]
    return loss, metrics


def make_train_step(module: CLIPModule, tx: optax.GradientTransformation, analogy_weight: float = 0.0):
    @partial(jax.jit, compiler_options=compiler_options())
    def step(params: Any, opt_state: Any, batch: dict[str, Any]):
        (_, metrics), grads = jax.value_and_grad(lambda p: loss_and_metrics(module, p, batch, analogy_weight),
                                                 has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def train_clip(out: Path, tokenizer_folder: Path, cfg: CLIPTrainConfig, seed: int = 0,
               deadline: float | None = None, image_size: int = 64,
               workers: int = 0) -> tuple[CLIPConfig, Any, dict[str, Any]]:
    """Train (or resume) CLIP under `out/clip/`; exports `out/clip/model/` (with tokenizer) at every save.
    `workers` processes render the scenes ahead of the steps."""
    folder = out / PHASE
    log = PhaseLog(folder, PHASE)
    t0 = time.time()
    probe = load_clip_tokenizer(tokenizer_folder)
    config = model_config(probe.vocab_size, image_size, cfg.width, cfg.layers)
    tokenizer = load_clip_tokenizer(tokenizer_folder, config.text.max_position_embeddings)
    preprocess = CLIPImagePreprocessor.for_image_size(image_size)
    module = build_clip(config)
    params = init_params(module, jax.random.PRNGKey(phase_seed(seed, "clip-init")))
    log(0, parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params))))

    scenes = Prefetcher(partial(render_batch, seed, n=cfg.batch_size, split="train",
                                 analogies=cfg.analogies), workers)

    optim = OptimConfig(cfg.lr, cfg.warmup, cfg.weight_decay)
    tx = make_optimizer(optim)
    state = start_state(folder, log, params, tx, cfg.steps, cfg.seconds)
    train_step = make_train_step(module, tx, cfg.analogy_weight)

    def step_fn(st: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        batch = model_inputs(scenes(step), preprocess, tokenizer)
        st["params"], st["opt_state"], metrics = train_step(st["params"], st["opt_state"], batch)
        return st, metrics

    def export(st: dict[str, Any]) -> None:
        save_clip(folder / "model", config, st["params"], preprocess)
        for name in TOKENIZER_FILES:
            (folder / "model" / name).write_bytes((tokenizer_folder / name).read_bytes())

    with scenes:
        state = run_loop(folder, log, state, step_fn, optim, cfg.save_every, cfg.log_every,
                         remaining(cfg.seconds, t0), deadline, export)
    validation = model_inputs(render_batch(seed, 0, cfg.eval_images, "validation"), preprocess, tokenizer)
    evaluation = jax.jit(lambda p, b: loss_and_metrics(module, p, b)[1])(state["params"], validation)
    report = {"steps": int(state["step"]), "total_steps": int(state["total_steps"]), "batch_size": cfg.batch_size,
              "train_seconds": round(time.time() - t0, 1),
              **{f"eval_{k}": float(v) for k, v in evaluation.items()}}
    log(int(state["step"]), **report)
    write_json(folder / "report.json", report)
    return config, state["params"], report
