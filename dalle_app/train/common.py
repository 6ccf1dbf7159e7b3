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
    warmup: int = 200
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b2: float = 0.99
    final_lr_ratio: float = 0.05


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The one optimizer every phase uses. The learning rate is a hyperparameter set from the host
    each step (`set_learning_rate`), so the step count can be decided after timing the first
    steps without compiling the step function again."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Warmup (linear from 0) then cosine decay over the rest of `total_steps`."""
    warmup = max(1, min(cfg.warmup, total_steps // 2))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.lr * cfg.final_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + np.cos(np.pi * progress))


def set_learning_rate(opt_state: Any, lr: float) -> Any:
    """Return `opt_state` (of `make_optimizer`) with its learning rate set to `lr`."""
    clip_state, adam_state = opt_state
    hyper = {**adam_state.hyperparams, "learning_rate": np.asarray(lr, np.float32)}
    return (clip_state, adam_state._replace(hyperparams=hyper))


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
    try:
        return flax.serialization.from_bytes(template, path.read_bytes())
    except ValueError as error:
        raise ValueError(f"{path} was saved with other model settings than this run's (sizes, profile, or "
                         f"a training run from before DalleBart's row + column positions); run with the "
                         f"settings that made it, or use a new --out folder. ({error})") from error


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


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_loop(
    folder: Path,
    log: PhaseLog,
    state: dict[str, Any],
    step_fn: Callable[[dict[str, Any], int], tuple[dict[str, Any], dict[str, Any]]],
    optim: OptimConfig,
    save_every: int,
    log_every: int,
    seconds: float | None = None,
    deadline: float | None = None,
    on_save: Callable[[dict[str, Any]], None] | None = None,
    probe_steps: int = 4,
    min_steps: int = 50,
) -> dict[str, Any]:
    """Run `step_fn(state, step) -> (state, metrics)` from `state["step"]` to `state["total_steps"]`,
    setting the learning rate of `state["opt_state"]` before each step.

    `state["total_steps"] == 0` means "as many as fit in `seconds`": the first step (compilation)
    is left out, the next `probe_steps` are timed, and the total is set from them, then re-fitted
    to the time left at every log until half-way (the schedule's end moves, its start does not);
    it is kept in the saved state, so a resumed run keeps the same schedule. Compilation and data
    preparation can eat a small budget whole: a budgeted run still makes at least `min_steps`
    steps, and `deadline` cannot stop it before. Saves `<folder>/state.msgpack`
    every `save_every` steps and at the end (then calls `on_save`, e.g. to export the model), logs
    metrics averaged over `log_every` steps, and stops early, after saving, past `deadline`.
    """
    t_start = time.time()
    window: list[dict[str, Any]] = []
    t_window = time.time()
    step = int(state["step"])
    probe_from: tuple[int, float] | None = None
    replan = state["total_steps"] == 0 and seconds is not None
    while state["total_steps"] == 0 or step < state["total_steps"]:
        total = int(state["total_steps"]) or 10**9
        state["opt_state"] = set_learning_rate(state["opt_state"], learning_rate(optim, step, total))
        state, metrics = step_fn(state, step)
        step += 1
        state["step"] = step
        window.append(metrics)
        if state["total_steps"] == 0:
            jax.block_until_ready(metrics)
            if probe_from is None:
                probe_from = (step, time.time())
            elif step - probe_from[0] >= probe_steps:
                per_step = (time.time() - probe_from[1]) / (step - probe_from[0])
                left = (seconds or 0.0) - (time.time() - t_start)
                state["total_steps"] = max(min_steps, step + 1, step + int(left / per_step))
                log(step, total_steps=int(state["total_steps"]), measured_s_per_step=round(per_step, 3))
        total = int(state["total_steps"]) or 10**9
        out_of_time = deadline is not None and time.time() > deadline and step >= (min_steps if replan else 0)
        if step % log_every == 0 and replan and state["total_steps"] and step < total // 2:
            # The machine's load changes: until half-way, re-fit the total to the time left at the
            # speed of the steps since the last log (a run that shared the CPU for a while and
            # then has it alone should plan with its speed now, not its average).
            jax.block_until_ready(metrics)  # steps dispatched but not yet run would count as done
            per_step = (time.time() - t_window) / len(window)
            left = (seconds or 0.0) - (time.time() - t_start)
            state["total_steps"] = total = max(min_steps, 2 * step, step + int(left / per_step))
        if step % log_every == 0 or step == total or out_of_time:
            means = {k: float(np.mean([np.asarray(m[k]) for m in window])) for k in window[0]}
            log(step, **means, lr=learning_rate(optim, step - 1, total), total_steps=total,
                s_per_step=round((time.time() - t_window) / len(window), 3))
            window, t_window = [], time.time()
        if step % save_every == 0 or step == total or out_of_time:
            save_state(folder / "state.msgpack", state)
            if on_save is not None:
                on_save(state)
        if out_of_time:
            log(step, stopped_early=True, total_steps=total)
            break
    return state


def start_state(folder: Path, log: PhaseLog, params: Any, tx: optax.GradientTransformation,
                steps: int | None, seconds: float | None, **extras: Any) -> dict[str, Any]:
    """The saved state of the phase if there is one (resume), else a fresh one.

    `steps` None means "decide from `seconds`" (total_steps 0 until `run_loop` has timed a few steps);
    a `steps` above a resumed state's total extends the run to it.
    """
    if steps is None and seconds is None:
        raise ValueError("give a step count or a time budget")
    fresh = {"step": 0, "total_steps": steps or 0, "params": params, "opt_state": tx.init(params), **extras}
    state = load_state(folder / "state.msgpack", fresh)
    if state is None:
        return fresh
    log(int(state["step"]), resumed=True, total_steps=int(state["total_steps"]))
    if steps is not None and steps > int(state["total_steps"]):
        # An explicit, larger step count continues a finished or running phase: the cosine
        # schedule is stretched to the new total (the learning rate goes back up part way).
        state["total_steps"] = steps
        log(int(state["step"]), extended_to=steps)
    return state


def remaining(seconds: float | None, since: float) -> float | None:
    """What is left of a `seconds` budget started at `since` (None: no budget)."""
    return None if seconds is None else seconds - (time.time() - since)


class Prefetcher:
    """`fn(step)` for consecutive steps, computed ahead in `workers` processes (0: inline).

    Rendering scenes is Python work (~1 ms per image): on a GPU it would otherwise leave the
    device idle most of the time. `fn` must be picklable (a module-level function or a partial
    of one); results come back in step order, at most `ahead` of them computed in advance.
    """

    def __init__(self, fn: Callable[[int], Any], workers: int, ahead: int | None = None) -> None:
        import collections
        import multiprocessing

        self.fn = fn
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
        self.ahead = ahead or 2 * max(workers, 1)
        self.pending: collections.deque = collections.deque()
        self.next_step = 0

    def __call__(self, step: int) -> Any:
        if self.pool is None:
            return self.fn(step)
        if not self.pending or self.pending[0][0] != step:
            self.pending.clear()
            self.next_step = step
        while len(self.pending) < self.ahead:
            self.pending.append((self.next_step, self.pool.apply_async(self.fn, (self.next_step,))))
            self.next_step += 1
        return self.pending.popleft()[1].get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
