"""What every training phase shares: the optimizer, resumable checkpoints, seeding, logging, timing.

A phase's whole state (step, params, optimizer state, host-side extras) is one msgpack file
written atomically every N steps, so a killed run continues from its last save with the same
learning-rate schedule. Batches are drawn from a seed derived from (run seed, phase, step), so a
resumed run sees the same data it would have seen without the interruption.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import flax.serialization
import jax
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `final_lr_ratio * lr`, and global-norm clipping."""

    lr: float
    steps: int
    warmup: int = 200
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b2: float = 0.99
    final_lr_ratio: float = 0.05


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The one optimizer every phase uses; only the numbers differ."""
    warmup = max(1, min(cfg.warmup, cfg.steps // 2))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.final_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only (not on biases, norms or scalars)."""
    return jax.tree_util.tree_map(lambda p: np.ndim(p) >= 2, params)


def phase_seed(seed: int, phase: str, step: int = 0) -> int:
    """A 32-bit seed that depends on the run seed, the phase name and the step (for resumable data)."""
    return zlib.crc32(f"{seed}:{phase}:{step}".encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a phase state atomically (tmp file + rename), so a kill mid-write never corrupts it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = jax.tree_util.tree_map(np.asarray, flax.serialization.to_state_dict(state))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(host))
    os.replace(tmp, path)


def load_state(path: Path, template: dict[str, Any]) -> dict[str, Any] | None:
    """Restore a state saved by `save_state` into the structure of `template`; None if there is none."""
    if not path.is_file():
        return None
    return flax.serialization.from_bytes(template, path.read_bytes())


# ---------------------------------------------------------------------------------------------
# Logging and timing


class PhaseLog:
    """Prints progress lines and appends them as JSON lines to `<folder>/log.jsonl`."""

    def __init__(self, folder: Path, phase: str) -> None:
        self.phase = phase
        self.file = folder / "log.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        self.start = time.time()

    def __call__(self, step: int, **values: Any) -> None:
        record = {"phase": self.phase, "step": step, "elapsed_s": round(time.time() - self.start, 1)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "phase")
        print(f"[{self.phase}] {shown}", flush=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def steps_for_budget(step_fn: Callable[[int], Any], seconds: float, probe: int = 3,
                     minimum: int = 20) -> int:
    """How many steps fit in `seconds`, measured by timing `probe` calls of `step_fn(i)`
    (after one untimed call that compiles). Used when a run is given minutes instead of steps."""
    jax.block_until_ready(step_fn(0))
    t0 = time.time()
    for i in range(probe):
        jax.block_until_ready(step_fn(i + 1))
    per_step = (time.time() - t0) / probe
    return max(minimum, int(seconds / max(per_step, 1e-6)))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_loop(
    folder: Path,
    log: PhaseLog,
    state: dict[str, Any],
    step_fn: Callable[[dict[str, Any], int], tuple[dict[str, Any], dict[str, Any]]],
    total_steps: int,
    save_every: int,
    log_every: int,
    deadline: float | None = None,
    on_save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run `step_fn(state, step) -> (state, metrics)` from `state["step"]` to `total_steps`.

    Saves `<folder>/state.msgpack` every `save_every` steps and at the end (then calls `on_save`,
    e.g. to export an intermediate model), logs metrics averaged over the last `log_every` steps,
    and stops early, after saving, once `time.time()` passes `deadline`.
    """
    window: list[dict[str, Any]] = []
    t_window = time.time()
    step = int(state["step"])
    while step < total_steps:
        state, metrics = step_fn(state, step)
        step += 1
        state["step"] = step
        window.append(metrics)
        out_of_time = deadline is not None and time.time() > deadline
        if step % log_every == 0 or step == total_steps or out_of_time:
            means = {k: float(np.mean([np.asarray(m[k]) for m in window])) for k in window[0]}
            log(step, **means, s_per_step=round((time.time() - t_window) / len(window), 3))
            window, t_window = [], time.time()
        if step % save_every == 0 or step == total_steps or out_of_time:
            save_state(folder / "state.msgpack", state)
            if on_save is not None:
                on_save(state)
        if out_of_time:
            log(step, stopped_early=True, total_steps=total_steps)
            break
    return state
