"""A short load test for CI: `python app.py` on the tiny model, 64 users at once, then a soak.

benchmarks/load.py does the full run (500 requests on the embedded model); this is the same
code, smaller, with its figures asserted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.app_support import make_tiny_models, tiny_model_spec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import load  # noqa: E402  (benchmarks/load.py)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_64_concurrent_users_then_a_soak_all_complete_with_their_own_prompt(tmp_path, capsys):
    spec = tiny_model_spec(make_tiny_models(tmp_path / "tiny"))
    out = tmp_path / "load.json"
    code = load.main(["--model", spec, "--concurrent", "64", "--total", "128", "--warmup", "1,16",
                      "--request-timeout", "300", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    figures = json.loads(out.read_text())
    burst, soak = figures["burst"], figures["soak"]
    for phase, count in ((burst, 64), (soak, 128)):
        assert phase["failed"] == phase["mixed"] == phase["lost"] == 0
        assert phase["completed"] + phase["rejected"] == count
    assert burst["completed"] == 64  # the queue holds 64: none of these may be turned away
    assert figures["rss_after_mib"] - figures["rss_before_mib"] < 150, printed
    assert "p50" in printed and "RSS before" in printed
