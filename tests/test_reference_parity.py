"""Parity with the original implementations on reference checkpoints.

Runs over every folder in tests/fixtures/reference/, or over every folder in
$DALLE_APP_PARITY_DIR when it is set. The kind comes from the folder's name prefix
(dallebart_, vqgan_, clip_); each kind's checks live in tests/parity/ as a
{quantity: check(folder)} table, and every applicable (folder, quantity) pair is one test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.parity import clip_checks, dallebart_model_checks, dallebart_text_checks, vqgan_checks

FIXTURES = Path(__file__).parent / "fixtures" / "reference"

CHECKS_BY_PREFIX = {
    "dallebart_": {**dallebart_text_checks.CHECKS, **dallebart_model_checks.CHECKS},
    "vqgan_": vqgan_checks.CHECKS,
    "clip_": clip_checks.CHECKS,
}


def _folders() -> list[Path]:
    root = Path(os.environ.get("DALLE_APP_PARITY_DIR") or FIXTURES)
    return sorted(p for p in root.iterdir() if p.is_dir())


def _cases() -> list:
    cases = []
    for folder in _folders():
        prefix = next((p for p in CHECKS_BY_PREFIX if folder.name.startswith(p)), None)
        if prefix is None:
            continue
        for name, check in CHECKS_BY_PREFIX[prefix].items():
            if getattr(check, "applies", lambda f: True)(folder):
                cases.append(pytest.param(folder, check, id=f"{folder.name}-{name}"))
    return cases


@pytest.mark.parametrize(("folder", "check"), _cases())
def test_parity(folder: Path, check) -> None:
    check(folder)
