"""Fine-tune of the trained DalleBart with the outline-weighted loss (`code_weights`), averaged.

Trained on plain cross-entropy, DalleBart draws held-out colour/shape pairs as a shape their
colour has in training (the blue star as a blue cross): most of its loss is on codes that repeat
the row above, learned by copying what is drawn, and little on the few codes where the caption
decides the outline. This phase weights those codes up for short fine-tunes.

One such fine-tune draws held-out pairs better but relations and some training scenes worse, and
how much it gains depends on the batches it draws. So the phase runs `cfg.finetunes` of them from
the same start, each on its own batches (seeds seed, seed + 1, ...), and exports the average of
their weights mixed with the starting weights (`cfg.base_share`): weight averaging of fine-tunes
of one model ("model soups", Wortsman et al. 2022) and interpolation towards the model they
started from (WiSE-FT) keep most of the gain and give back what the fine-tunes lost (README,
Evaluation). From the first step the same weighting starves the copying the model needs first,
so the phase runs after `dallebart`, on its dataset and final state. Its model,
`out/dallebart-outline/model/`, is what `export` ships when it exists.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from dalle_app.models.dallebart import DalleBart, DalleBartConfig
from dalle_app.train.common import PhaseLog, remaining, write_json
from dalle_app.train.dallebart_training import PHASE as BASE
from dalle_app.train.dallebart_training import (
    DalleBartTrainConfig,
    evaluate,
    fit,
    load_dataset,
    save_dallebart,
    with_position_table,
)
from dalle_app.train.text_training import CaptionEncoder

PHASE = "dallebart-outline"


def weight_average(trees: list[Any], shares: list[float]) -> Any:
    """The parameter trees' weighted sum (`shares` add up to 1)."""
    if not np.isclose(sum(shares), 1.0):
        raise ValueError(f"shares must add up to 1, not {sum(shares)}")
    return jax.tree_util.tree_map(lambda *leaves: sum(w * x for w, x in zip(shares, leaves)), *trees)


def finetune_outline(out: Path, tokenizer_folder: Path, max_text_length: int, cfg: DalleBartTrainConfig,
                     seed: int = 0, deadline: float | None = None) -> dict[str, Any]:
    """`cfg.finetunes` fine-tunes of `out/dallebart`'s final state under `out/dallebart-outline/run<k>/`,
    averaged with that state (`cfg.base_share`) into `out/dallebart-outline/model/`; resumable like
    every phase (a time budget is split evenly between the fine-tunes)."""
    base, folder = out / BASE, out / PHASE
    for needed in (base / "state.msgpack", base / "train_codes.npz", base / "validation_codes.npz",
                   base / "model" / "config.json"):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: run `python -m dalle_app.train dallebart --out {out}` first")
    if cfg.finetunes < 1 or not 0.0 <= cfg.base_share < 1.0:
        raise ValueError(f"need finetunes >= 1 and 0 <= base_share < 1, not {cfg.finetunes}, {cfg.base_share}")
    log = PhaseLog(folder, PHASE)
    t0 = time.time()
    config = DalleBartConfig.from_pretrained(base / "model")
    module = DalleBart(config)
    captions_to_ids = CaptionEncoder(tokenizer_folder, max_text_length)
    uncond = captions_to_ids.unconditional()
    data, eval_data = (load_dataset(base / name) for name in ("train_codes.npz", "validation_codes.npz"))
    trained = flax.serialization.msgpack_restore((base / "state.msgpack").read_bytes())["params"]
    start = jax.tree_util.tree_map(jnp.asarray, trained)
    before = evaluate(module, start, eval_data, uncond)

    tuned = []
    for k in range(cfg.finetunes):
        left = remaining(cfg.seconds, t0)
        seconds = None if left is None else left / (cfg.finetunes - k)
        run = folder / f"run{k}"
        state = fit(run, PhaseLog(run, f"{PHASE}-{k}"), module, start, data, eval_data, uncond, cfg, seed + k,
                    tokenizer_folder, seconds, deadline, phase=PHASE)
        tuned.append(state["params"])
    shares = [cfg.base_share] + [(1.0 - cfg.base_share) / cfg.finetunes] * cfg.finetunes
    mixed = weight_average([start] + tuned, shares)
    save_dallebart(folder / "model", config, with_position_table(mixed), tokenizer_folder)

    report = {"steps": int(state["step"]), "total_steps": int(state["total_steps"]), "batch_size": cfg.batch_size,
              "outline_weight": cfg.outline_weight, "finetunes": cfg.finetunes, "base_share": cfg.base_share,
              "train_seconds": round(time.time() - t0, 1),
              **{f"before_{k}": v for k, v in before.items()},
              **{f"last_finetune_{k}": v for k, v in evaluate(module, state["params"], eval_data, uncond).items()},
              **evaluate(module, mixed, eval_data, uncond)}
    log(int(state["step"]), **report)
    write_json(folder / "report.json", report)
    return report
