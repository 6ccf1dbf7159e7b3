"""DalleBart training on the trained VQGAN's codes, with blank captions for super-conditioning.

The dataset is rendered once and pre-encoded: N training scenes → VQGAN codes (N, h*w), one
code per color of a scene (`color_consistent_codes`), and caption token ids, exactly as the app
tokenizes prompts (`TextProcessor`: normalizer, then the BPE, padded to max_text_length). Each
step draws a batch from it with a step-derived seed and replaces ~15% of the captions by the
unconditional input, the *raw* empty string tokenized without normalization (`<s></s><pad>…`),
which is what the app feeds the unconditional branch of super-conditioning. The loss is
next-code cross-entropy with the decoder fed BOS + codes[:-1].
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dalle_app.data import batch as data_batch
from dalle_app.model_files import GENERATION_CONFIG, TOKENIZER_FILES, WORD_FILE
from dalle_app.models.dallebart import DalleBart, DalleBartConfig, stack_layers
from dalle_app.models.vqgan import VQGANConfig, VQModel, build_vqgan
from dalle_app.models.weights import flatten, unflatten
from dalle_app.request import SamplingSettings
from dalle_app.train.codes import code_encoder
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
from dalle_app.train.text_training import CaptionEncoder, cached_normalizer

PHASE = "dallebart"
# What the app samples this model with unless told otherwise (written as generation_config.json):
# chosen on prompts of *training* combinations (evaluate.seen_prompts), never on the held-out ones.
RECOMMENDED_SAMPLING = SamplingSettings(temperature=0.6, top_k=50, top_p=1.0, cond_scale=1.5)


def model_config(vqgan: VQGANConfig, encoder_vocab_size: int, max_text_length: int, d_model: int = 128,
                 encoder_layers: int = 2, decoder_layers: int = 3, heads: int = 4,
                 activation: str = "gelu") -> DalleBartConfig:
    """The published architecture (NormFormer, GLU with ffn ≈ 2.67·d, no biases) at a small size.

    Special ids follow dalle-mini: decoder_start = bos = eos = pad = image_vocab_size (the extra
    row of the image embedding), image_vocab_size = the VQGAN's n_embed.
    """
    ffn = int(round(d_model * 2.67 / 8)) * 8
    return DalleBartConfig(
        encoder_vocab_size=encoder_vocab_size, image_vocab_size=vqgan.n_embed,
        image_length=vqgan.num_codes, max_text_length=max_text_length, d_model=d_model,
        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        activation_function=activation, normalize_text=True,
    )


def config_json(config: DalleBartConfig) -> dict[str, Any]:
    """config.json in the layout of the published DALL·E Mini (`model_type` "dallebart")."""
    d = dataclasses.asdict(config)
    d.update({
        "architectures": ["eBart"], "model_type": "dallebart", "is_encoder_decoder": True,
        "min_length": config.image_length + 1, "max_length": config.image_length + 1,
        "do_sample": True, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "gradient_checkpointing": False, "use_cache": True,
        "use_scan": True,  # the layers are saved stacked (stack_layers), as the original reads them
    })
    return d


def save_dallebart(folder: Path, config: DalleBartConfig, params: Any, tokenizer_folder: Path | None = None) -> None:
    """Write config.json + flax_model.msgpack (the published scanned layout: layers stacked under
    `FlaxBart{Encoder,Decoder}Layers`, no "params" wrapper), generation_config.json (the
    recommended sampling settings), plus the tokenizer files and word list from `tokenizer_folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json(config), indent=2, sort_keys=True) + "\n")
    host = unflatten(stack_layers({k: np.asarray(v, np.float32) for k, v in flatten(params).items()}))
    tmp = folder / "flax_model.msgpack.tmp"
    tmp.write_bytes(flax.serialization.msgpack_serialize(host))
    tmp.replace(folder / "flax_model.msgpack")
    (folder / GENERATION_CONFIG).write_text(json.dumps(dataclasses.asdict(RECOMMENDED_SAMPLING), indent=2, sort_keys=True) + "\n")
    if tokenizer_folder is not None:
        for name in (*TOKENIZER_FILES, WORD_FILE):
            (folder / name).write_bytes((tokenizer_folder / name).read_bytes())


@dataclasses.dataclass(frozen=True)
class DalleBartTrainConfig:
    steps: int | None = 1500  # None: as many as fit in `seconds`
    seconds: float | None = None
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 150
    weight_decay: float = 0.01
    blank_caption_prob: float = 0.15
    outline_weight: float = 0.0  # extra loss weight on codes unlike the code above them (code_weights)
    finetunes: int = 1  # dallebart-outline: fine-tunes of the same start on other batches, averaged
    base_share: float = 0.0  # dallebart-outline: share of the starting weights in the exported average
    num_samples: int = 60_000
    eval_samples: int = 512
    save_every: int = 200
    log_every: int = 25
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 3
    heads: int = 4
    activation: str = "gelu"  # "gelu_new": tanh GELU, a step ~3.5% cheaper on CPU (fine-tunes keep their start's)
    grid_positions: bool = True  # train the decoder's position table as row + column (see below)


# ---------------------------------------------------------------------------------------------
# Decoder positions as row + column
#
# Code i of the image sits at row i // w, column i % w of the code grid, and the decoder's input at
# position i predicts code i. Drawing an outline means copying what the row above did at the same
# column; with one free vector per position the model has to discover that 256 times over. The
# trained parameters hold a row table and a column table instead, and the published layout's
# single table `embed_positions` is their sum (`with_position_table`), so the checkpoint and the
# model class are unchanged.

POSITIONS = ("model", "decoder", "embed_positions")


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def to_grid_positions(params: Any, side: int, rng: jax.Array) -> Any:
    """Model parameters → training parameters with `embed_positions` = {"rows", "columns"}, fresh
    tables of `side` vectors whose sums have the variance of the table they replace."""
    table = _get(params, POSITIONS)["embedding"]
    if table.shape[0] != side * side:
        raise ValueError(f"the decoder has {table.shape[0]} positions, not a {side}x{side} grid")
    std = float(jnp.std(table)) / np.sqrt(2.0)
    rows, columns = jax.random.normal(rng, (2, side, table.shape[1]), table.dtype) * std
    return _replace(params, POSITIONS, {"rows": rows, "columns": columns})


def with_position_table(params: Any) -> Any:
    """Training parameters → model parameters (identity when positions are a plain table)."""
    positions = _get(params, POSITIONS)
    if "rows" not in positions:
        return params
    rows, columns = positions["rows"], positions["columns"]
    table = (rows[:, None, :] + columns[None, :, :]).reshape(-1, rows.shape[-1])
    return _replace(params, POSITIONS, {"embedding": table})


# ---------------------------------------------------------------------------------------------
# Dataset: rendered once, encoded with the VQGAN, tokenized like the app tokenizes prompts


def render_chunk(seed: int, c: int, n: int, chunk: int, split: str, word_file: Path) -> tuple[np.ndarray, list[str]]:
    """Scenes of chunk `c` of an `n`-scene dataset: uint8 images and normalized captions."""
    size = min(chunk, n - c * chunk)
    b = data_batch(phase_seed(seed, f"{PHASE}-data-{split}", c), size, split)
    normalize = cached_normalizer(word_file)
    return b.images, [normalize(caption) for caption in b.captions]


def encode_scenes(vq_module: VQModel, vq_params: Any, captions_to_ids: CaptionEncoder, n: int, seed: int,
                  split: str, chunk: int = 1024, log: PhaseLog | None = None,
                  workers: int = 0) -> dict[str, np.ndarray]:
    """Render `n` scenes of `split` (in `workers` processes), encode them to codes (n, h*w) uint16,
    one code per color of an image (`color_consistent_codes`), and tokenize their captions."""
    encode = code_encoder(vq_module)
    codes, ids, masks = [], [], []
    chunks = Prefetcher(partial(render_chunk, seed, n=n, chunk=chunk, split=split,
                                word_file=captions_to_ids.word_file), workers)
    for c, start in enumerate(range(0, n, chunk)):
        size = min(chunk, n - start)
        images, captions = chunks(c)
        pixels = images.astype(np.float32) / 255.0
        for i in range(0, size, 256):
            part = pixels[i:i + 256]
            padded = np.concatenate([part, np.zeros((256 - len(part),) + part.shape[1:], np.float32)])
            codes.append(encode(vq_params, padded)[:len(part)].astype(np.uint16))
        tok = captions_to_ids.tokenize_normalized(captions)
        ids.append(tok[0])
        masks.append(tok[1])
        if log is not None and (c + 1) % 10 == 0:
            log(0, encoded=start + size, of=n, split=split)
    chunks.close()
    return {"codes": np.concatenate(codes), "input_ids": np.concatenate(ids), "attention_mask": np.concatenate(masks)}


def load_dataset(path: Path) -> dict[str, np.ndarray]:
    """A dataset cached by `load_or_build_dataset` (codes, input_ids, attention_mask)."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def load_or_build_dataset(path: Path, build) -> dict[str, np.ndarray]:
    """Cache a dataset as .npz so a resumed run does not render and encode it again."""
    if path.is_file():
        return load_dataset(path)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    return data


# ---------------------------------------------------------------------------------------------
# Training


def decoder_inputs(codes: jax.Array, bos: int) -> jax.Array:
    """Teacher forcing: BOS followed by all codes but the last."""
    return jnp.concatenate([jnp.full((codes.shape[0], 1), bos, codes.dtype), codes[:, :-1]], axis=1)


def code_weights(codes: jax.Array, side: int, outline_weight: float) -> jax.Array:
    """Per-code loss weights (N, side*side), mean 1 over the batch: 1 + `outline_weight` where a
    code differs from the code above it (never in the first row).

    Most codes of a scene repeat the row above (background, the inside of a shape): the model
    learns them by copying, without the caption. The codes that start or end a run down a column
    are where an object's outline, so its shape, is decided, and where the caption has to be read:
    weighting them up asks the model to read the shape word rather than follow the colour drawn.
    """
    grid = codes.reshape(codes.shape[0], side, side)
    above = jnp.concatenate([grid[:, :1], grid[:, :-1]], axis=1)
    w = (1.0 + outline_weight * (grid != above)).reshape(codes.shape)
    return w / jnp.mean(w)


def make_loss(module: DalleBart, outline_weight: float = 0.0):
    """Loss for the gradient (cross-entropy weighted by `code_weights`) and metrics (plain
    cross-entropy and accuracy, comparable across weightings)."""
    side = int(round(np.sqrt(module.config.image_length)))

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        codes = batch["codes"]
        logits = module.apply({"params": with_position_table(params)}, batch["input_ids"], batch["attention_mask"],
                              decoder_inputs(codes, module.config.decoder_start_token_id))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
        loss = jnp.mean(ce * code_weights(codes, side, outline_weight)) if outline_weight else ce.mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
        return loss, {"loss": ce.mean(), "accuracy": accuracy}

    return loss_fn


def make_train_step(module: DalleBart, tx: optax.GradientTransformation, outline_weight: float = 0.0):
    loss_fn = make_loss(module, outline_weight)

    @jax.jit  # XLA's own CPU options: unlike the sampler's (hardware.CPU_COMPILER_OPTIONS), they keep
    # YNNPACK's dot fusion, which runs this step's products of batch × 256 rows about 1.3x faster
    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def sample_batch(data: dict[str, np.ndarray], uncond: tuple[np.ndarray, np.ndarray], seed: int, step: int,
                 batch_size: int, blank_prob: float, phase: str = PHASE) -> dict[str, jax.Array]:
    """Step `step`'s batch: random rows, ~blank_prob of them with the unconditional caption."""
    rng = np.random.default_rng(phase_seed(seed, phase, step))
    rows = rng.integers(0, len(data["codes"]), batch_size)
    ids, mask = data["input_ids"][rows].copy(), data["attention_mask"][rows].copy()
    blank = rng.random(batch_size) < blank_prob
    ids[blank], mask[blank] = uncond
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "codes": jnp.asarray(data["codes"][rows].astype(np.int32))}


def evaluate(module: DalleBart, params: Any, data: dict[str, np.ndarray], uncond: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Held-out loss/accuracy with captions, and the loss with blank captions (the gap is what the
    caption tells the model, the signal super-conditioning amplifies)."""
    loss_fn = jax.jit(make_loss(module))
    out: dict[str, list[float]] = {"eval_loss": [], "eval_accuracy": [], "eval_loss_blank": []}
    n = len(data["codes"]) // 64 * 64
    for i in range(0, n, 64):
        rows = slice(i, i + 64)
        b = {"input_ids": jnp.asarray(data["input_ids"][rows]), "attention_mask": jnp.asarray(data["attention_mask"][rows]),
             "codes": jnp.asarray(data["codes"][rows].astype(np.int32))}
        _, m = loss_fn(params, b)
        out["eval_loss"].append(float(m["loss"]))
        out["eval_accuracy"].append(float(m["accuracy"]))
        b["input_ids"] = jnp.asarray(np.tile(uncond[0], (64, 1)))
        b["attention_mask"] = jnp.asarray(np.tile(uncond[1], (64, 1)))
        out["eval_loss_blank"].append(float(loss_fn(params, b)[1]["loss"]))
    return {k: float(np.mean(v)) for k, v in out.items()}


def fit(folder: Path, log: PhaseLog, module: DalleBart, params: Any, data: dict[str, np.ndarray],
        eval_data: dict[str, np.ndarray], uncond: tuple[np.ndarray, np.ndarray], cfg: DalleBartTrainConfig,
        seed: int, tokenizer_folder: Path, seconds: float | None, deadline: float | None,
        phase: str = PHASE) -> dict[str, Any]:
    """The loop every DalleBart phase shares: resumable AdamW steps on `data`'s batches (drawn from
    `seed` and `phase`) with `cfg`'s loss, exporting `folder/model/` and logging the held-out
    figures at every save. Returns the final state."""
    optim = OptimConfig(cfg.lr, cfg.warmup, cfg.weight_decay)
    tx = make_optimizer(optim)
    state = start_state(folder, log, params, tx, cfg.steps, cfg.seconds)
    train_step = make_train_step(module, tx, cfg.outline_weight)

    def step_fn(st: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        b = sample_batch(data, uncond, seed, step, cfg.batch_size, cfg.blank_caption_prob, phase)
        st["params"], st["opt_state"], metrics = train_step(st["params"], st["opt_state"], b)
        return st, metrics

    def export(st: dict[str, Any]) -> None:
        save_dallebart(folder / "model", module.config, with_position_table(st["params"]), tokenizer_folder)
        log(int(st["step"]), **evaluate(module, st["params"], eval_data, uncond))

    return run_loop(folder, log, state, step_fn, optim, cfg.save_every, cfg.log_every, seconds, deadline, export)


def train_dallebart(
    out: Path, vq_config: VQGANConfig, vq_params: Any, tokenizer_folder: Path, max_text_length: int,
    cfg: DalleBartTrainConfig, seed: int = 0, deadline: float | None = None, workers: int = 0,
) -> tuple[DalleBartConfig, Any, dict[str, Any]]:
    """Train (or resume) DalleBart under `out/dallebart/`; exports `out/dallebart/model/` at every save.
    `workers` processes render the dataset's scenes."""
    folder = out / PHASE
    log = PhaseLog(folder, PHASE)
    t0 = time.time()
    captions_to_ids = CaptionEncoder(tokenizer_folder, max_text_length)
    config = model_config(vq_config, captions_to_ids.vocab_size, max_text_length, cfg.d_model,
                          cfg.encoder_layers, cfg.decoder_layers, cfg.heads, cfg.activation)
    vq_module = build_vqgan(vq_config)
    data = load_or_build_dataset(folder / "train_codes.npz", lambda: encode_scenes(
        vq_module, vq_params, captions_to_ids, cfg.num_samples, seed, "train", log=log, workers=workers))
    eval_data = load_or_build_dataset(folder / "validation_codes.npz", lambda: encode_scenes(
        vq_module, vq_params, captions_to_ids, cfg.eval_samples, seed, "validation"))
    t_data = time.time() - t0
    log(0, dataset=len(data["codes"]), dataset_seconds=round(t_data, 1))
    uncond = captions_to_ids.unconditional()

    module = DalleBart(config)
    text = jnp.ones((1, max_text_length), jnp.int32)
    params = jax.jit(module.init)(jax.random.PRNGKey(phase_seed(seed, "dallebart-init")), text, text,
                                  jnp.ones((1, config.image_length), jnp.int32))["params"]
    log(0, parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params))))
    if cfg.grid_positions:
        params = to_grid_positions(params, vq_config.latent_size, jax.random.PRNGKey(phase_seed(seed, "dallebart-grid")))

    state = fit(folder, log, module, params, data, eval_data, uncond, cfg, seed, tokenizer_folder,
                remaining(cfg.seconds, t0), deadline)
    report = {"steps": int(state["step"]), "total_steps": int(state["total_steps"]), "batch_size": cfg.batch_size,
              "dataset": len(data["codes"]), "dataset_seconds": round(t_data, 1),
              "train_seconds": round(time.time() - t0, 1),
              **evaluate(module, state["params"], eval_data, uncond)}
    log(int(state["step"]), **report)
    write_json(folder / "report.json", report)
    return config, with_position_table(state["params"]), report
