"""Shared test setup: CPU only, an empty Hugging Face cache, deterministic RNG stream, fixture
paths; under CI=true a browser test that is skipped (no Chromium, no Playwright) is reported as a failure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# An empty Hugging Face cache of the tests' own: the `auto` default model and the availability
# checks must not depend on what the machine running the tests has downloaded.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dalle-app-tests-hf-")
os.environ.pop("HF_HUB_CACHE", None)

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def running_in_ci() -> bool:
    """CI services set CI=true (.ci/run does too): there every test must really run."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skipped browser test means the UI went untested: in CI that is a failure, not a skip."""
    report = yield
    if report.skipped and running_in_ci() and item.get_closest_marker("browser"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"browser test skipped under CI=true, which must run it: {reason}"
    return report


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return FIXTURES / "reference"


@pytest.fixture(scope="session")
def specs_dir() -> Path:
    return FIXTURES / "specs"
