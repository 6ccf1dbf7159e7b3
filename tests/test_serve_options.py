"""`python -m dalle_app.serve` options and the deployment settings they make (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dalle_app import serve
from dalle_app.loop_size import LOOP_SIZES
from dalle_app.scheduler import MAX_QUEUED_IMAGES, MAX_QUEUED_IMAGES_ENV


def scaling(argv: list[str], resources: dict[str, float] | None = None) -> serve.Scaling:
    return serve.default_scaling(serve.parse_args(argv), resources or {})


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2", "--min-replicas", "1", "--max-replicas", "3"], "not both"),
    (["--min-replicas", "2"], "needs both"),
    (["--min-replicas", "3", "--max-replicas", "2"], "min-replicas <="),
    (["--replicas", "0"], "at least 1"),
    (["--address", "ray://head:10001"], "Ray Client"),
    (["--target-ongoing-requests", "0"], "must be > 0"),
])
def test_contradictory_or_unusable_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        serve.parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_one_replica_per_gpu_by_default_and_cpu_replicas_without_gpus():
    assert scaling([], {"GPU": 4.0, "CPU": 64.0}) == serve.Scaling(replicas=4, gpus_per_replica=1)
    assert scaling([], {"CPU": 2.0}) == serve.Scaling(replicas=1, gpus_per_replica=0)
    assert scaling(["--gpus-per-replica", "2"], {"GPU": 4.0}).replicas == 2
    assert scaling(["--replicas", "3"], {"GPU": 8.0}).replicas == 3


def test_fixed_replicas_reserve_their_resources_and_hold_a_schedulers_worth_of_requests():
    options = serve.Scaling(replicas=2, gpus_per_replica=1, cpus_per_replica=2).deployment_options(
        {"DALLE_APP_MODELS": "folder", "HF_HUB_OFFLINE": "1", "HOME": "/srv/visitor"})
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == MAX_QUEUED_IMAGES + max(LOOP_SIZES)  # one-image requests
    assert options["max_queued_requests"] == serve.MAX_QUEUED_REQUESTS
    actor = options["ray_actor_options"]
    assert (actor["num_gpus"], actor["num_cpus"]) == (1, 2)
    assert actor["runtime_env"]["env_vars"] == {"DALLE_APP_MODELS": "folder", "HF_HUB_OFFLINE": "1"}


def test_a_smaller_scheduler_queue_makes_a_smaller_replica_bound():
    options = serve.Scaling(replicas=1).deployment_options({MAX_QUEUED_IMAGES_ENV: "32"})
    assert options["max_ongoing_requests"] == 32 + max(LOOP_SIZES)


def test_autoscaling_options_become_serves_autoscaling_config():
    s = scaling(["--min-replicas", "1", "--max-replicas", "5", "--target-ongoing-requests", "8"])
    options = s.deployment_options({})
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 5,
                                             "target_ongoing_requests": 8}


def test_the_single_process_app_and_the_options_do_not_import_ray():
    code = ("import sys, dalle_app.ui, dalle_app.serve; dalle_app.serve.parse_args(['--replicas', '2']); "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
