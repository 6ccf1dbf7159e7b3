"""Train the embedded model: `python -m dalle_app.train {tokenizers,vqgan,clip,dallebart,...,all} --out runs/x`.

Examples:
    # everything, sized to a time budget (2 CPU cores: about 90 minutes), then copy to assets/
    python -m dalle_app.train all --out runs/embedded --assets assets --minutes-budget 90
    # one phase with an explicit step count (needs the phases it builds on in the same --out)
    python -m dalle_app.train dallebart --out runs/embedded --steps 3000
    # a GPU machine: bigger models, batches and datasets
    python -m dalle_app.train all --out runs/gpu --assets assets --profile gpu --minutes-budget 8

Every phase saves its state in `--out/<phase>/state.msgpack` every few hundred steps and exports
its model to `--out/<phase>/model/`; running the same command again resumes where it stopped.
Outputs: `--out/<phase>/log.jsonl` (losses), `--out/<phase>/report.json` (final figures),
`--out/timings.json` (seconds per phase).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from dalle_app.model_files import EMBEDDED_FOLDER_NAMES
from dalle_app.train.profiles import PROFILES, Profile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dalle_app.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("phase", choices=["tokenizers", "vqgan", "clip", "dallebart", "dallebart-outline", "vqgan-decoder",
                                     "export", "all"])
    p.add_argument("--out", type=Path, required=True, help="run folder (states, logs, exported models)")
    p.add_argument("--assets", type=Path, default=None,
                   help=f"copy the trained models here as {', '.join(n + '/' for n in EMBEDDED_FOLDER_NAMES.values())} "
                        "(with `all`, after training; with `export`, required)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="model and batch sizes (default: cpu)")
    p.add_argument("--steps", type=int, default=None, help="steps of the phase run (not with `all`)")
    p.add_argument("--vqgan-steps", type=int, default=None)
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--dallebart-steps", type=int, default=None)
    p.add_argument("--dallebart-outline-steps", type=int, default=None,
                   help="steps of each outline-weighted fine-tune after DalleBart (0 skips them)")
    p.add_argument("--vqgan-decoder-steps", type=int, default=None,
                   help="decoder-only VQGAN fine-tuning after DalleBart (0 skips it)")
    p.add_argument("--minutes-budget", type=float, default=None,
                   help="size every phase without an explicit step count to this total wall time")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch size of the phase run")
    p.add_argument("--workers", type=int, default=None,
                   help="processes rendering scenes ahead of the steps (default: the profile's; 0 on CPU)")
    p.add_argument("--dataset-size", type=int, default=None,
                   help="DalleBart scenes rendered and encoded once (default: the profile's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def phase_steps(args: argparse.Namespace, phase: str) -> int | None:
    explicit = getattr(args, f"{phase.replace('-', '_')}_steps")
    if args.phase == phase and args.steps is not None:
        return args.steps
    return explicit


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase == "all" and args.steps is not None:
        raise SystemExit("--steps applies to one phase; with `all` use --vqgan-steps/--clip-steps/--dallebart-steps/"
                         "--dallebart-outline-steps/--vqgan-decoder-steps")
    if args.phase == "export" and args.assets is None:
        raise SystemExit("export needs --assets FOLDER")
    profile: Profile = PROFILES[args.profile]
    if args.workers is not None:
        profile = dataclasses.replace(profile, workers=args.workers)
    if args.dataset_size is not None:
        profile = dataclasses.replace(profile, dallebart=dataclasses.replace(profile.dallebart,
                                                                               num_samples=args.dataset_size))
    args.out.mkdir(parents=True, exist_ok=True)
    from dalle_app.train import phases

    t0 = time.time()
    budget = None if args.minutes_budget is None else args.minutes_budget * 60.0
    overrides = {name: phase_steps(args, name)
                 for name in ("vqgan", "clip", "dallebart", "dallebart-outline", "vqgan-decoder")}
    timings = phases.run(args.phase, args.out, profile, args.seed, overrides, budget, args.batch_size, args.assets)
    timings["total"] = round(time.time() - t0, 1)
    previous = json.loads((args.out / "timings.json").read_text()) if (args.out / "timings.json").is_file() else {}
    (args.out / "timings.json").write_text(json.dumps({**previous, **timings}, indent=2) + "\n")
    print("[train] seconds per phase:", json.dumps(timings), flush=True)
    print("[train] profile:", json.dumps(dataclasses.asdict(profile), default=str), flush=True)


if __name__ == "__main__":
    main()
