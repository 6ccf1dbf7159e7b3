"""Text side of DalleBart parity: normalizer output and processor ids against the original's.

Each check reads the folder's own config (max_text_length, normalize_text), tokenizer files,
word list and prompts, so other reference folders of the family are checked the same way.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from dalle_app.hub import normalizer_word_file
from dalle_app.text import TextProcessor, TokenizedPrompts


def _expected_text(folder: Path) -> dict:
    path = folder / "expected_text.json"
    assert path.is_file(), (
        f"{folder} has no expected_text.json (the prompts and the original's normalized text): "
        "every DalleBart reference folder needs one, or its text pipeline goes unchecked"
    )
    return json.loads(path.read_text(encoding="utf8"))


@functools.lru_cache(maxsize=8)
def _processor(folder: Path) -> TextProcessor:
    return TextProcessor.from_pretrained(folder, normalizer_word_file(folder))


@functools.lru_cache(maxsize=8)
def _tokenized(folder: Path) -> TokenizedPrompts:
    return _processor(folder)(_expected_text(folder)["prompts"])


def check_normalized(folder: Path) -> None:
    expected = _expected_text(folder)
    normalized = [_processor(folder).normalize(p) for p in expected["prompts"]]
    assert len(normalized) == len(expected["normalized"]), "expected_text.json is inconsistent"
    mismatches = [
        (prompt, want, got)
        for prompt, want, got in zip(
            expected["prompts"], expected["normalized"], normalized, strict=True
        )
        if want != got
    ]
    assert not mismatches, "normalizer differs (prompt, expected, got): " + repr(mismatches)


def _array_check(name: str):
    def check(folder: Path) -> None:
        with np.load(folder / "expected.npz") as data:
            assert name in data.files, f"{folder}/expected.npz has no {name!r}"
            expected = data[name]
        got = getattr(_tokenized(folder), name)
        assert got.shape == expected.shape, f"{name}: shape {got.shape}, expected {expected.shape}"
        rows = np.flatnonzero((got != expected).any(axis=1))
        if rows.size:
            raise AssertionError(
                f"{name} differs in rows {rows.tolist()}; row {rows[0]}: got "
                f"{got[rows[0]].tolist()}, expected {expected[rows[0]].tolist()}"
            )

    check.__name__ = f"check_{name}"
    return check


CHECKS = {
    "normalized": check_normalized,
    **{
        name: _array_check(name)
        for name in ("input_ids", "attention_mask", "input_ids_uncond", "attention_mask_uncond")
    },
}
