"""Opt-in fine-tune of the trained DalleBart with the outline-weighted loss (`code_weights`).

Trained on plain cross-entropy, DalleBart draws held-out colour/shape pairs as a shape their
colour has in training (the blue star as a blue cross): most of its loss is on codes that repeat
the row above, learned by copying what is drawn, and little on the few codes where the caption
decides the outline. This phase weights those codes up for a short fine-tune. Measured on the
embedded model (README, Evaluation): held-out pairs better, relations and some training scenes
worse, so it is not part of `all`. From the first step the same weighting starves the copying
the model needs first, so it runs after `dallebart`, on its dataset and final state, and exports
to `out/dallebart-outline/model/`, which `export` takes over `out/dallebart/model/`.
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
from dalle_app.train.dallebart import PHASE as BASE
from dalle_app.train.dallebart import DalleBartTrainConfig, evaluate, fit
from dalle_app.train.text import CaptionEncoder

PHASE = "dallebart-outline"


def finetune_outline(out: Path, tokenizer_folder: Path, max_text_length: int, cfg: DalleBartTrainConfig,
                     seed: int = 0, deadline: float | None = None) -> dict[str, Any]:
    """Fine-tune `out/dallebart`'s final state with `cfg.outline_weight`; resumable like every phase."""
    base, folder = out / BASE, out / PHASE
    for needed in (base / "state.msgpack", base / "train_codes.npz", base / "heldout_codes.npz",
                   base / "model" / "config.json"):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: run `python -m dalle_app.train dallebart --out {out}` first")
    log = PhaseLog(folder, PHASE)
    t0 = time.time()
    config = DalleBartConfig.from_pretrained(base / "model")
    module = DalleBart(config)
    captions_to_ids = CaptionEncoder(tokenizer_folder, max_text_length)
    uncond = captions_to_ids.unconditional()
    data, eval_data = (_arrays(base / name) for name in ("train_codes.npz", "heldout_codes.npz"))
    trained = flax.serialization.msgpack_restore((base / "state.msgpack").read_bytes())["params"]
    params = jax.tree_util.tree_map(jnp.asarray, trained)
    before = evaluate(module, params, eval_data, uncond)

    state = fit(folder, log, module, params, data, eval_data, uncond, cfg, seed, tokenizer_folder,
                remaining(cfg.seconds, t0), deadline, phase=PHASE)
    report = {"steps": int(state["step"]), "total_steps": int(state["total_steps"]), "batch_size": cfg.batch_size,
              "outline_weight": cfg.outline_weight, "train_seconds": round(time.time() - t0, 1),
              **{f"before_{k}": v for k, v in before.items()}, **evaluate(module, state["params"], eval_data, uncond)}
    log(int(state["step"]), **report)
    write_json(folder / "report.json", report)
    return report


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
