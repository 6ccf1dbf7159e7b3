"""A short load test for CI: `python app.py` on the tiny model, 64 users at once, then a soak.

benchmarks/load.py does the full run (500 requests on the embedded model); this is the same
code, smaller, with its figures asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.app_support import make_tiny_models, tiny_model_spec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import load  # noqa: E402  (benchmarks/load.py)

BURST = 64  # the scheduler holds 256 waiting images: none of these 1-image requests may be turned away
SOAK = 128
MIN_SOAK_COMPLETED = 0.9  # the share of the soak that must come back with images


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_64_concurrent_users_then_a_soak_most_complete_and_the_rest_are_told_busy(tmp_path, capsys):
    spec = tiny_model_spec(make_tiny_models(tmp_path / "tiny"))
    out = tmp_path / "load.json"
    code = load.main(["--model", spec, "--concurrent", str(BURST), "--total", str(SOAK), "--warmup", "1,16",
                      "--request-timeout", "300", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    figures = json.loads(out.read_text())
    burst, soak = figures["burst"], figures["soak"]
    for phase, count in ((burst, BURST), (soak, SOAK)):
        assert phase["failed"] == phase["mixed"] == phase["lost"] == 0, printed
        assert phase["completed"] + phase["rejected"] == count, printed
        # every request that did not complete got the clear busy answer, nothing else
        assert sum(phase["busy_answers"].values()) == phase["rejected"], phase["busy_answers"]
        assert all(any(m in answer.lower() for m in load.BUSY_MARKERS) for answer in phase["busy_answers"])
    assert burst["completed"] == BURST, printed
    assert soak["completed"] >= math.ceil(MIN_SOAK_COMPLETED * SOAK), printed
    assert len(soak["latencies"]) == soak["completed"]
    assert figures["rss_after_mib"] - figures["rss_before_mib"] < 150, printed
    assert "p50" in printed and "RSS before" in printed
