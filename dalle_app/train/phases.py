"""The phases in order (tokenizers → VQGAN → CLIP → DalleBart → its outline fine-tunes → VQGAN
decoder → export), with budgets and timings.

Each phase reads what the earlier ones wrote under `--out` (tokenizers, `vqgan/model/`), so a
phase can be run alone, and `all` can be re-run to resume. CLIP trains before DalleBart so a run
cut short still has every model; DalleBart gets the remaining budget.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from dalle_app.model_files import EMBEDDED_FOLDER_NAMES
from dalle_app.train.profiles import Profile

ASSET_FOLDERS = {"vqgan": EMBEDDED_FOLDER_NAMES["vqgan"], "dallebart": EMBEDDED_FOLDER_NAMES["dalle"],
                 "clip": EMBEDDED_FOLDER_NAMES["clip"]}
"""The assets/ folder each training phase's model is exported to."""
ORDER = ("tokenizers", "vqgan", "clip", "dallebart", "dallebart-outline", "vqgan-decoder")
# Where each asset comes from, first existing folder wins (a fine-tuned model over the original).
ASSET_SOURCES = {"vqgan": ("vqgan-decoder", "vqgan"), "dallebart": ("dallebart-outline", "dallebart"),
                 "clip": ("clip",)}
DEADLINE_SLACK = 1.15
MAX_ASSET_BYTES = 30_000_000  # a phase sized from the budget is stopped (after saving) past this factor


def _train_config(profile: Profile, phase: str, steps: int | None, seconds: float | None, batch_size: int | None):
    cfg = getattr(profile, phase.replace("-", "_"))
    changes: dict[str, Any] = {}
    if steps is not None:
        changes.update(steps=steps, seconds=None)
    elif seconds is not None:
        changes.update(steps=None, seconds=seconds)
    if batch_size is not None:
        changes["batch_size"] = batch_size
    return dataclasses.replace(cfg, **changes)


def run(phase: str, out: Path, profile: Profile, seed: int, steps: dict[str, int | None],
        budget: float | None, batch_size: int | None, assets: Path | None) -> dict[str, float]:
    """Run one phase (or `all`), return seconds per phase."""
    from dalle_app.models.vqgan import load_vqgan
    from dalle_app.train.clip_training import train_clip
    from dalle_app.train.dallebart_training import train_dallebart
    from dalle_app.train.dallebart_outline import finetune_outline
    from dalle_app.train.text_training import build_tokenizers
    from dalle_app.train.vqgan_training import train_vqgan
    from dalle_app.train.vqgan_decoder import finetune_decoder

    phases = ORDER if phase == "all" else (() if phase == "export" else (phase,))
    t_all = time.time()
    shares = dict(profile.budget_shares)
    timings: dict[str, float] = {}
    tokenizers = out / "tokenizers"
    for name in phases:
        if steps.get(name) == 0:
            continue
        t0 = time.time()
        seconds = deadline = None
        if budget is not None and name in shares and steps.get(name) is None:
            if name == "dallebart" and phase == "all":  # what is left but the later shares, less a margin
                after = budget * sum(shares.get(later, 0.0) for later in ORDER[ORDER.index(name) + 1:])
                seconds = max(60.0, budget - (time.time() - t_all) - after - 60.0)
            else:  # with `all` its share; a phase run alone gets the whole budget
                seconds = budget * shares[name] if phase == "all" else budget
            deadline = t0 + seconds * DEADLINE_SLACK
        if name == "tokenizers":
            if not (tokenizers / "report.json").is_file():
                build_tokenizers(out, seed, profile.tokenizer_captions, profile.tokenizer_vocab_size)
        elif name == "vqgan":
            train_vqgan(out, profile.vqgan_model, _train_config(profile, name, steps.get(name), seconds, batch_size),
                        seed, deadline, profile.workers)
        elif name == "clip":
            _require(tokenizers / "report.json", "tokenizers")
            train_clip(out, tokenizers / "clip", _train_config(profile, name, steps.get(name), seconds, batch_size),
                       seed, deadline, profile.vqgan_model.resolution, profile.workers)
        elif name == "dallebart":
            _require(tokenizers / "report.json", "tokenizers")
            _require(out / "vqgan" / "model" / "flax_model.msgpack", "vqgan")
            vq = load_vqgan(out / "vqgan" / "model")
            train_dallebart(out, vq.config, vq.params, tokenizers / "dalle", profile.max_text_length,
                            _train_config(profile, name, steps.get(name), seconds, batch_size), seed, deadline,
                            profile.workers)
        elif name == "dallebart-outline":
            finetune_outline(out, tokenizers / "dalle", profile.max_text_length,
                             _train_config(profile, name, steps.get(name), seconds, batch_size), seed, deadline)
        elif name == "vqgan-decoder":
            _require(out / "vqgan" / "model" / "flax_model.msgpack", "vqgan")
            finetune_decoder(out, _train_config(profile, name, steps.get(name), seconds, batch_size), seed, deadline,
                             profile.workers)
        timings[name] = round(time.time() - t0, 1)
        print(f"[train] {name} took {timings[name]} s", flush=True)
    if assets is not None and phase in ("all", "export"):
        t0 = time.time()
        export(out, assets)
        timings["export"] = round(time.time() - t0, 1)
    return timings


def _require(path: Path, phase: str) -> None:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m dalle_app.train {phase} --out {path.parents[1]}` first "
                         "(or `all`)")


def export(out: Path, assets: Path, max_bytes: int = MAX_ASSET_BYTES) -> dict[str, int]:
    """Copy each phase's latest exported model to `assets/<name>-embedded/`; returns bytes per folder.

    Weights stay float32 unless the three folders together exceed `max_bytes`; then they are
    stored as float16 (every loader casts to its compute dtype).
    """
    sizes = {}
    for phase, name in ASSET_FOLDERS.items():
        found = [out / p / "model" for p in ASSET_SOURCES[phase] if (out / p / "model").is_dir()]
        if not found:
            print(f"[export] {out / phase / 'model'} does not exist yet; {name} left as it is", flush=True)
            continue
        source = found[0]
        target = assets / name
        staging = assets / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        sizes[name] = sum(f.stat().st_size for f in target.iterdir())
        print(f"[export] {source} -> {target} ({sizes[name] / 1e6:.2f} MB)", flush=True)
    if sum(sizes.values()) > max_bytes:
        for name in sizes:
            to_float16(assets / name)
            sizes[name] = sum(f.stat().st_size for f in (assets / name).iterdir())
        print(f"[export] over {max_bytes / 1e6:.0f} MB in float32: weights stored as float16 "
              f"({sum(sizes.values()) / 1e6:.2f} MB)", flush=True)
    return sizes


def to_float16(folder: Path) -> None:
    """Rewrite the folder's flax_model.msgpack / model.safetensors with float16 floating-point leaves."""
    import flax.serialization
    import numpy as np
    from safetensors.numpy import save_file

    from dalle_app.models.weights import flatten, read_msgpack, read_safetensors, unflatten

    def half(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float16) if np.issubdtype(a.dtype, np.floating) else a

    msgpack_path, safetensors_path = folder / "flax_model.msgpack", folder / "model.safetensors"
    if msgpack_path.is_file():
        tree = unflatten({k: half(np.asarray(v)) for k, v in flatten(read_msgpack(msgpack_path)).items()})
        msgpack_path.write_bytes(flax.serialization.msgpack_serialize(tree))
    if safetensors_path.is_file():
        save_file({k: half(v) for k, v in read_safetensors(safetensors_path).items()}, str(safetensors_path),
                  metadata={"format": "pt"})
