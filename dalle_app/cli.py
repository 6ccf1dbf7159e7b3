"""Command line: `python -m dalle_app "a red square above a blue circle" --images 9 --out grid.png`
(or `dalle-app ...` once installed with `pip install .`).

`--init-image start.png --keep-rows 8` keeps the top 8 code rows of a picture and draws the rest
(a PNG written by this app starts from its own codes); `--seamless` makes pictures that tile.

Same options and the same validation as the app; writes the CLIP-ranked grid as one PNG whose
text chunks hold the prompt and parameters, and prints each image's seed and score. Unlike the
app, `--model` may also be a local folder or a hub repo: the person at the keyboard owns them.
Exit codes: 0 done, 2 an invalid option or setting (argparse's own code), 1 the model could not
be loaded or generation failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

from dalle_app import __version__
from dalle_app import images as pngs
from dalle_app.catalog import BUILTIN_MODELS, Catalog, ModelLoadError, ModelPool, check_entry, entry_for, load_scheduler
from dalle_app.request import RANDOM_SEED
from dalle_app.uploads import start_completion
from dalle_app.validation import NUMBERS, ValidationError, validate_request


USAGE_ERROR = 2
"""The exit code for an invalid option or setting, the same as argparse's."""


def program_name() -> str:
    """How the command was started: the installed `dalle-app` script or `python -m dalle_app`."""
    return "dalle-app" if Path(sys.argv[0]).name == "dalle-app" else "python -m dalle_app"


def build_parser() -> argparse.ArgumentParser:
    n, t, k, p, c = (NUMBERS[x] for x in ("num_images", "temperature", "top_k", "top_p", "cond_scale"))
    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Generate images for a prompt and save them as one PNG grid (ranked by CLIP).",
    )
    parser.add_argument("prompt", help="what to draw, e.g. 'a red square above a blue circle'")
    parser.add_argument("--out", "-o", type=Path, default=Path("grid.png"),
                        help="grid PNG to write (default: grid.png)")
    parser.add_argument("--images", "-n", type=float, default=n.default,
                        help=f"number of images, {int(n.minimum)}-{int(n.maximum)} (default {int(n.default)})")
    parser.add_argument("--negative-prompt", default="", help="what the images should not show")
    parser.add_argument("--model", default=None,
                        help=f"{', '.join(e.name for e in BUILTIN_MODELS)}, a configured model, a local folder "
                        "or a hub repo owner/name[@revision], optionally +vqgan+clip "
                        "(default: $DALLE_APP_DEFAULT_MODEL, else the embedded model)")
    parser.add_argument("--seed", type=float, default=RANDOM_SEED, help="-1 for random (default)")
    recommended = "default: the model's recommended value, else DALL·E Mini's"
    parser.add_argument("--temperature", type=float, default=None, help=f"{recommended} {t.default}")
    parser.add_argument("--top-k", type=float, default=None, help=f"{recommended} {int(k.default)}")
    parser.add_argument("--top-p", type=float, default=None, help=f"{recommended} {p.default}")
    parser.add_argument("--cond-scale", type=float, default=None, help=f"{recommended} {c.default}")
    parser.add_argument("--save-images", type=Path, default=None, metavar="DIR",
                        help="also write each image as its own PNG into DIR")
    parser.add_argument("--init-image", type=Path, default=None, metavar="PATH",
                        help="complete this picture: keep its top --keep-rows code rows, draw the rest")
    parser.add_argument("--keep-rows", type=float, default=None,
                        help="code rows kept from the top of --init-image, 1 to rows-1 (default: half)")
    parser.add_argument("--seamless", action="store_true", help="make pictures that tile left-right and top-bottom")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


BAR_WIDTH = 30
"""Characters of the plain progress bar."""


class _StderrBar:
    """A plain progress bar for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.stream, self.n = total, desc, stream or sys.stderr, 0

    def update(self, n: int) -> None:
        self.n += n
        filled = int(BAR_WIDTH * self.n / max(self.total, 1))
        self.stream.write(f"\r{self.desc} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.n}/{self.total}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def progress_bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _StderrBar(total, desc)
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr)


def _catalog_with(model: str | None, catalog: Catalog) -> Catalog:
    """The configured models, plus `model` when it is a folder or repo given on the command line."""
    if model is None or model in catalog.entries:
        return catalog
    from dalle_app.hub import describe_availability

    try:
        extra = check_entry(entry_for(model), describe_availability)
    except ValueError as e:
        raise ValueError(f"--model {e}") from None
    return Catalog([*catalog.entries.values(), extra], catalog.default)


def check_outputs(out: Path, save_images: Path | None) -> None:
    """Reject output paths that cannot be written as asked, before any model is loaded."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the name of the PNG file to write")
    if save_images is not None and save_images.exists() and not save_images.is_dir():
        raise ValueError(f"--save-images {save_images} is a file; give a folder")


def main(argv: Sequence[str] | None = None, *, pool: ModelPool | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if pool is None:
            pool = ModelPool(_catalog_with(args.model, Catalog.from_env()), load_scheduler)
        catalog = pool.catalog
        request = validate_request(
            args.prompt, args.negative_prompt, args.model, args.images, args.seed,
            args.temperature, args.top_k, args.top_p, args.cond_scale, args.seamless,
            models=catalog.usability(), default_model=catalog.default, recommended=catalog.recommended(),
        )
        check_outputs(args.out, args.save_images)
        if args.keep_rows is not None and args.init_image is None:
            raise ValidationError("--keep-rows needs --init-image, the picture to complete.")
    except (ValidationError, ValueError) as e:  # an invalid option, or a bad $DALLE_APP_* setting
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    for notice in request.notices:
        print(f"note: {notice}", file=sys.stderr)

    started = time.monotonic()
    try:
        scheduler = pool.get(request.model)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model {request.model} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if args.init_image is not None:
        try:
            request = start_completion(request, args.init_image, args.keep_rows, scheduler.pipeline.vqgan)
        except ValidationError as e:
            scheduler.close()
            print(f"error: {e}", file=sys.stderr)
            return USAGE_ERROR
    job = scheduler.submit(request)
    bar, done_steps, final = None, 0, None
    try:
        for event in job.events():
            if event.kind == "progress":
                bar = bar or progress_bar(event.total, "generating")
                bar.update(event.step - done_steps)
                done_steps = event.step
            elif event.kind != "queued":
                final = event
    except KeyboardInterrupt:
        job.cancel()
        print("\ncancelled", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
        scheduler.close()
    if final is None or final.kind != "done" or final.result is None:
        print(f"error: {final.error if final else 'generation ended without a result'}", file=sys.stderr)
        return 1

    for notice in catalog.text_notices(request.model, final.result.normalized[0], final.result.truncated[0]):
        print(f"note: {notice}", file=sys.stderr)
    ranked = final.result.images[0]  # the pipeline's ranking (by CLIP score, best first)
    params = request.parameters()
    meta = params | {"seeds": [g.seed for g in ranked], "scores": [round(float(g.score), 4) for g in ranked]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pngs.save_png(pngs.make_grid([g.image for g in ranked]), args.out, meta)
    if args.save_images is not None:
        args.save_images.mkdir(parents=True, exist_ok=True)
        for rank, g in enumerate(ranked, start=1):
            pngs.save_png(g.image, args.save_images / f"{rank:02d}-seed{g.seed}.png",
                          params | {"seed": g.seed, "rank": rank, "score": float(g.score)}, g.codes)
    for rank, g in enumerate(ranked, start=1):
        print(f"#{rank}\tseed {g.seed}\tscore {float(g.score):.4f}")
    print(f"wrote {args.out} ({len(ranked)} images, {time.monotonic() - started:.1f} s)", file=sys.stderr)
    return 0
