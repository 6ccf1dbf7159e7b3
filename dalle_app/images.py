"""Grids and PNG metadata: every PNG the app writes says how it was made.

The prompt and the parameters travel in PNG text chunks (tEXt, or iTXt when the prompt is not
Latin-1), under the key `parameters` as JSON, plus `prompt` on its own for tools that only
show one field. Gradio copies string entries of `Image.info` into the PNGs it serves, so the
same `with_metadata` works for the gallery and for files written here.

A generated image also carries its own VQGAN codes (`codes`: comma-separated, row-major), so
completing it later starts from exactly those codes instead of re-encoding its pixels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, PngImagePlugin

METADATA_KEY = "parameters"
PROMPT_KEY = "prompt"
CODES_KEY = "codes"
SOFTWARE = "dalle_app"


def metadata_text(parameters: Mapping[str, Any], codes: Sequence[int] | None = None) -> dict[str, str]:
    """The text chunks for one image (with its `codes`) or grid."""
    chunks = {
        PROMPT_KEY: str(parameters.get("prompt", "")),
        METADATA_KEY: json.dumps(dict(parameters), ensure_ascii=False, sort_keys=True),
        "Software": SOFTWARE,
    }
    if codes is not None:
        chunks[CODES_KEY] = ",".join(str(int(c)) for c in codes)
    return chunks


def with_metadata(image: Image.Image, parameters: Mapping[str, Any],
                  codes: Sequence[int] | None = None) -> Image.Image:
    """A copy of `image` whose `info` carries the text chunks (kept when saved as PNG)."""
    tagged = image.copy()
    tagged.info.update(metadata_text(parameters, codes))
    return tagged


def read_codes(image: Image.Image) -> tuple[tuple[int, ...], str] | None:
    """The codes a generated PNG carries and the model that made them, or None when it has none
    (or they do not parse)."""
    text = {**getattr(image, "text", {}), **{k: v for k, v in image.info.items() if isinstance(v, str)}}
    try:
        codes = tuple(int(c) for c in text[CODES_KEY].split(","))
        model = str(json.loads(text.get(METADATA_KEY, "{}")).get("model", ""))
    except (KeyError, ValueError, AttributeError):
        return None
    return codes, model


def grid_shape(count: int) -> tuple[int, int]:
    """Columns and rows of the most square grid that holds `count` images (3x3 for 9)."""
    if count < 1:
        raise ValueError("a grid needs at least one image")
    cols = math.ceil(math.sqrt(count))
    return cols, math.ceil(count / cols)


def make_grid(images: Sequence[Image.Image], padding: int = 2, background: str = "white") -> Image.Image:
    """Tile images (in order, row by row) into one RGB image; all cells take the largest size."""
    cols, rows = grid_shape(len(images))
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new(
        "RGB",
        (cols * cell_w + (cols + 1) * padding, rows * cell_h + (rows + 1) * padding),
        background,
    )
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (padding + c * (cell_w + padding), padding + r * (cell_h + padding)))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, parameters: Mapping[str, Any],
             codes: Sequence[int] | None = None) -> Path:
    """Write `image` as a PNG carrying the metadata (and its codes, for one generated image)."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata_text(parameters, codes).items():
        info.add_text(key, value)  # Pillow switches to iTXt for non-Latin-1 text
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path

