"""Shared test setup: CPU only, deterministic RNG stream, fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return FIXTURES / "reference"


@pytest.fixture(scope="session")
def specs_dir() -> Path:
    return FIXTURES / "specs"
