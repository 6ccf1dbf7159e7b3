"""The app on Ray Serve: a real private Ray cluster on 127.0.0.1, two CPU replicas of the embedded
model, the Gradio front end in this process, called through gradio_client.

Beside it runs the single-process app (same models, same compilation cache, so the replicas
load without recompiling), as the reference for "same seed, same images".
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from dalle_app import serve as serve_cli
from dalle_app.catalog import Catalog, ModelPool, load_scheduler
from dalle_app.ui import BUSY_MESSAGE, build_app
from tests.app_support import serve

HAVE_RAY = importlib.util.find_spec("ray") is not None  # imported later, after its loopback settings
if not HAVE_RAY and os.environ.get("CI", "").lower() == "true":
    raise RuntimeError("Ray is missing: CI installs it with requirements-test.txt")
pytestmark = [
    pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install -r requirements-serve.txt"),
    pytest.mark.timeout(600),
]

SIZES = (2, 4, 9, 16)
"""Image batches compiled before the replicas start (the burst's loops reach 16)."""
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("square", "circle", "triangle", "star")
RESULT_TIMEOUT_S = 300  # generous: a hang fails the test instead of blocking it
LOST_WORDS = "model server handling this request stopped"


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """(single-process URL, Ray front-end URL, replica handle); everything stopped afterwards."""
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DALLE_APP_JAX_CACHE", str(root / "jax"))  # shared with the replicas (forwarded)
        env.setenv("DALLE_APP_WARMUP", ",".join(map(str, SIZES)))
        env.delenv("DALLE_APP_MODELS", raising=False)
        env.setenv("DALLE_APP_DEFAULT_MODEL", "embedded")
        catalog = Catalog.from_env()
        pool = ModelPool(catalog, load_scheduler)
        pool.get(catalog.default).pipeline.warmup(SIZES)  # fills the compilation cache
        cluster = serve_cli.connect(None, num_cpus=2)
        try:
            from dalle_app.serve_backend import deploy

            scaling = serve_cli.Scaling(replicas=2, cpus_per_replica=1)
            cluster.handle = deploy(scaling.deployment_options(os.environ), SIZES)
            with serve(build_app(catalog, pool)) as local_url, \
                    serve(serve_cli.build_front_end(catalog, cluster.handle)) as ray_url:
                yield local_url, ray_url, cluster.handle
        finally:
            cluster.close()


@pytest.fixture(scope="module")
def client(apps):
    c = Client(apps[1], verbose=False)
    yield c
    c.close()


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


def replica_stats(handle, want: int = 2, calls: int = 40) -> dict[str, dict]:
    """Each replica's outcome counts, by replica id (Serve picks the replica: ask until `want` answered)."""
    seen: dict[str, dict] = {}
    for _ in range(calls):
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) >= want:
            break
    return seen


def test_same_seed_gives_the_same_images_as_the_single_process_app(apps, client):
    local_url, _, _ = apps
    args = dict(prompt="a red square above a blue circle", num_images=2, seed=4321, api_name="/generate")
    local = Client(local_url, verbose=False)
    try:
        local_gallery, local_summary = local.predict(**args)
    finally:
        local.close()
    gallery, summary = client.predict(**args)
    assert local_summary["replica"] == "local"
    assert summary["replica"] not in ("", "local") and summary["status"] == "done"
    assert summary["seeds"] == local_summary["seeds"] and summary["scores"] == local_summary["scores"]
    for ours, theirs in zip(gallery, local_gallery, strict=True):
        # the same pixels (up to the VQGAN's float rounding across batch sizes)
        assert np.abs(pixels(ours["image"]) - pixels(theirs["image"])).max() <= 2
        assert ours["caption"] == theirs["caption"]


def test_the_cluster_listens_on_loopback_but_for_one_grpc_port_per_replica(apps):
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to all interfaces (a fixed
    "[::]:0" in Ray, guarded by Ray's token authentication); everything else stays on 127.0.0.1."""
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert len({c.pid for c in listening}) > 2  # Ray's servers and the replicas, not just this process
    wide = [c for c in listening if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    replicas = [c.pid for c in wide if psutil.Process(c.pid).name().startswith("ray::ServeReplica")]
    assert len(replicas) == len(wide) and len(set(replicas)) == len(replicas), [
        (c.laddr, psutil.Process(c.pid).name()) for c in wide]
    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"


def test_validation_messages_are_the_front_ends(client):
    with pytest.raises(AppError, match="Please enter a prompt"):
        client.predict(prompt="   ", api_name="/generate")
    with pytest.raises(AppError, match="num_images must be"):
        client.predict(prompt="a red square", num_images=99, api_name="/generate")


def test_complete_runs_on_the_replicas_like_in_the_single_process_app(apps, client, tmp_path):
    """The front end checks the upload; a replica encodes it with its VQGAN and completes it."""
    start = tmp_path / "start.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(start)
    args = dict(prompt="a red square above a blue circle", keep_rows=8, num_images=2, seed=77, api_name="/complete")
    local = Client(apps[0], verbose=False)
    try:
        local_gallery, local_summary = local.predict(handle_file(str(start)), **args)
    finally:
        local.close()
    gallery, summary = client.predict(handle_file(str(start)), **args)
    assert summary["status"] == "done" and summary["replica"] not in ("", "local") and summary["keep_rows"] == 8
    assert summary["seeds"] == local_summary["seeds"] and summary["scores"] == local_summary["scores"]
    for ours, theirs in zip(gallery, local_gallery, strict=True):
        assert np.abs(pixels(ours["image"]) - pixels(theirs["image"])).max() <= 2
    with pytest.raises(AppError, match="keep_rows must be a whole number from 1 to 15"):
        client.predict(handle_file(str(start)), "a red square", 16, api_name="/complete")
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    with pytest.raises(AppError, match="not a picture this app can read"):
        client.predict(handle_file(str(not_a_picture)), "a red square", 8, api_name="/complete")


def burst(url: str, users: int, each: int, num_images: int = 2) -> list[tuple[dict, dict | str]]:
    """`users` clients at once, each sending `each` requests in turn: (what was asked, the summary
    or the error message) per request."""
    def user(u: int) -> list[tuple[dict, dict | str]]:
        out = []
        c = Client(url, verbose=False)
        try:
            for i in range(each):
                ask = dict(prompt=f"a {COLORS[u % len(COLORS)]} {SHAPES[(u + i) % len(SHAPES)]}",
                           num_images=num_images, seed=1000 * u + i)
                job = c.submit(**ask, api_name="/generate")
                try:
                    out.append((ask, job.result(timeout=RESULT_TIMEOUT_S)[1]))
                except AppError as e:
                    out.append((ask, str(e)))
        finally:
            c.close()
        return out

    with ThreadPoolExecutor(users) as pool:
        return [r for rs in pool.map(user, range(users)) for r in rs]


def test_a_burst_of_32_users_times_2_completes_on_both_replicas_with_nothing_lost(apps):
    results = burst(apps[1], users=32, each=2)
    assert len(results) == 64
    failures = [(ask, got) for ask, got in results if not isinstance(got, dict)]
    assert not failures, failures[:3]  # 64 requests fit the replicas' queues: none turned away
    for ask, summary in results:
        assert summary["status"] == "done" and summary["prompt"] == ask["prompt"]
        assert sorted(summary["seeds"]) == [ask["seed"], ask["seed"] + 1]
    by_replica = {}
    for _, summary in results:
        by_replica[summary["replica"]] = by_replica.get(summary["replica"], 0) + 1
    assert len(by_replica) == 2, by_replica  # both replicas served


def test_stop_cancels_the_request_on_its_replica(apps, client):
    handle = apps[2]
    before = sum(s.get("cancelled", 0) for s in replica_stats(handle).values())
    # keep both replicas busy so the request to cancel is still waiting or decoding when cancelled;
    # one session per request: Gradio's cancel stops all of a session's running events, and the
    # fair queue counts a session's images
    others = [Client(apps[1], verbose=False) for _ in range(4)]
    ahead = [c.submit(prompt="a blue star", num_images=16, seed=s, api_name="/generate") for s, c in enumerate(others)]
    user = Client(apps[1], verbose=False)
    try:
        victim = user.submit(prompt="a pink cross", num_images=16, seed=99, api_name="/generate")
        while not victim.outputs():  # its first update ("queued") says a replica has it
            time.sleep(0.1)
        victim.cancel()
        for job in ahead:
            assert job.result(timeout=RESULT_TIMEOUT_S)[1]["status"] == "done"
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while sum(s.get("cancelled", 0) for s in replica_stats(handle).values()) != before + 1:
            assert time.monotonic() < deadline, "the replica never saw the cancellation"
            time.sleep(0.5)
        assert not any(isinstance(o, (list, tuple)) and len(o) == 2 and isinstance(o[1], dict)
                       and o[1].get("status") == "done" for o in victim.outputs())
    finally:
        for c in [user, *others]:
            c.close()


def replica_pid(replica: str) -> int:
    import ray

    from dalle_app.serve_backend import APP_NAME

    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{serve_cli.DEPLOYMENT_NAME}#{replica}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def test_killing_a_replica_mid_burst_loses_nothing_silently_and_the_other_keeps_serving(apps, client):
    _, url, handle = apps
    victim = sorted(replica_stats(handle))[0]
    pid = replica_pid(victim)
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(burst(url, users=16, each=2, num_images=4)))
    runner.start()
    # kill once the burst is being generated: the replica's counters move when a request ends
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    started = sum(sum(v for k, v in s.items() if k != "replica") for s in replica_stats(handle).values())
    while sum(sum(v for k, v in s.items() if k != "replica") for s in replica_stats(handle).values()) == started:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    runner.join(RESULT_TIMEOUT_S * 2)
    assert not runner.is_alive(), "a request hung after its replica was killed"
    assert len(results) == 32
    for ask, got in results:  # each one completed (maybe retried elsewhere) or was told why not
        if isinstance(got, dict):
            assert got["status"] == "done" and got["prompt"] == ask["prompt"]
            assert sorted(got["seeds"]) == [ask["seed"] + i for i in range(4)]
        else:
            assert LOST_WORDS in got or BUSY_MESSAGE in got, got
    assert any(isinstance(got, dict) for _, got in results)
    # the app keeps serving
    _, summary = client.predict(prompt="a green circle", num_images=1, seed=5, api_name="/generate")
    assert summary["status"] == "done" and summary["replica"] != victim
