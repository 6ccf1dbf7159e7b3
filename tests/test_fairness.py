"""The fair queue: who a client is, the per-client limit, round-robin loops, and a greedy
client against polite ones on the real server through gradio_client."""

from __future__ import annotations

import asyncio
import threading
import time

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from starlette.requests import Request as StarletteRequest

from dalle_app.admission import (
    MAX_IMAGES_PER_CLIENT_ENV,
    UNKNOWN_CLIENT,
    Admission,
    ClientLimitError,
    client_key,
)
from dalle_app.catalog import Catalog, ModelEntry, ModelPool, check_entry
from dalle_app.hub import describe_availability
from dalle_app.request import LOCAL_CLIENT, GenerationRequest
from dalle_app.scheduler import MAX_QUEUED_IMAGES_ENV, QueueFullError, Scheduler
from dalle_app.ui import BUSY_MESSAGE, Handlers, build_app, visitor_key
from tests.app_support import SlowPipeline, make_tiny_models, serve
from tests.test_scheduler import FakePipeline
from tests.test_ui import ScriptedScheduler, collect, make_handlers, run

PUBLIC_A, PUBLIC_B = "93.184.216.34", "151.101.1.69"


# ---- who is a client --------------------------------------------------------------------------

def test_client_key_prefers_the_user_then_the_address_then_the_session():
    assert client_key(username="ada", host=PUBLIC_A, session="s1") == "user:ada"
    assert client_key(host=PUBLIC_A, session="s1") == f"ip:{PUBLIC_A}"
    assert client_key(host="192.168.1.20", session="s1") == "ip:192.168.1.20"  # a visitor on the local network
    assert client_key(host="127.0.0.1", session="s1") == "session:s1"  # a local app: one address for everyone
    assert client_key(host="::1", session="s2") == "session:s2"
    assert client_key() == UNKNOWN_CLIENT


def test_behind_a_proxy_the_visitor_is_the_last_public_forwarded_address():
    # a Space's proxy connects from a private address and appends the visitor's address
    assert client_key(host="10.16.3.80", forwarded_for=PUBLIC_A, session="s") == f"ip:{PUBLIC_A}"
    # entries the visitor wrote itself come first and are not believed
    assert client_key(host="10.16.3.80", forwarded_for=f"{PUBLIC_B}, {PUBLIC_A}", session="s") == f"ip:{PUBLIC_A}"
    # proxies of the host's own network after the visitor are skipped
    assert client_key(host="10.0.0.2", forwarded_for=f"{PUBLIC_A}, 10.0.0.9", session="s") == f"ip:{PUBLIC_A}"
    # a local reverse proxy (or Gradio's own front server) on loopback
    assert client_key(host="127.0.0.1", forwarded_for=PUBLIC_A, session="s") == f"ip:{PUBLIC_A}"
    assert client_key(host="127.0.0.1", forwarded_for="garbage, 10.1.2.3", session="s") == "session:s"
    # a visitor connecting directly cannot pose as someone else with the header
    assert client_key(host=PUBLIC_B, forwarded_for=PUBLIC_A, session="s") == f"ip:{PUBLIC_B}"


def test_ipv6_visitors_are_keyed_by_their_64_bit_prefix():
    a = client_key(host="2a00:1450:4007:80e::200e")
    assert a == client_key(host="2a00:1450:4007:80e:1234::1") == "ip:2a00:1450:4007:80e::/64"
    assert a != client_key(host="2a00:1450:4007:80f::200e")
    assert client_key(host=f"::ffff:{PUBLIC_A}") == f"ip:{PUBLIC_A}"


def _starlette_request(host: str, headers: dict[str, str]) -> StarletteRequest:
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "client": (host, 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return StarletteRequest(scope)


def test_visitor_key_reads_gradios_request():
    proxied = gr.Request(_starlette_request("10.16.3.80", {"X-Forwarded-For": f"{PUBLIC_B}, {PUBLIC_A}"}),
                         session_hash="abc")
    assert visitor_key(proxied) == f"ip:{PUBLIC_A}"
    assert visitor_key(gr.Request(_starlette_request("127.0.0.1", {}), session_hash="abc")) == "session:abc"
    assert visitor_key(gr.Request(_starlette_request(PUBLIC_A, {}), username="ada", session_hash="x")) == "user:ada"
    # a queued request rebuilt from plain values, as Gradio does for some events
    rebuilt = gr.Request(username=None, session_hash="q", headers={"x-forwarded-for": PUBLIC_B},
                         client={"host": "10.0.0.1", "port": 1})
    assert visitor_key(rebuilt) == f"ip:{PUBLIC_B}"
    assert visitor_key(None) == LOCAL_CLIENT


# ---- the per-client limit ---------------------------------------------------------------------

def test_admission_counts_images_per_client_until_released():
    admission = Admission(max_images_per_client=32)
    first, second = admission.admit("a", 16), admission.admit("a", 16)
    with pytest.raises(ClientLimitError) as info:
        admission.admit("a", 1)
    assert str(info.value) == ("You already have 32 images waiting (at most 32 per visitor); "
                               "try again when they are done.")
    other = admission.admit("b", 16)  # another client is not affected
    first.release()
    first.release()  # twice: counted once
    assert admission.waiting("a") == 16 and admission.waiting("b") == 16
    admission.admit("a", 16).release()
    second.release()
    other.release()
    assert admission.waiting("a") == admission.waiting("b") == 0


def test_a_request_bigger_than_the_limit_is_told_the_limit():
    with pytest.raises(ClientLimitError, match="At most 8 images can wait per visitor; ask for 8 or fewer"):
        Admission(max_images_per_client=8).admit("a", 9)


def test_limits_come_from_the_environment():
    assert Admission.from_env({}).max_images_per_client == 32
    assert Admission.from_env({MAX_IMAGES_PER_CLIENT_ENV: " 12 "}).max_images_per_client == 12
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError, match=f"{MAX_IMAGES_PER_CLIENT_ENV} must be a whole number"):
            Admission.from_env({MAX_IMAGES_PER_CLIENT_ENV: bad})


def test_the_queue_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(MAX_QUEUED_IMAGES_ENV, "24")
    with Scheduler(FakePipeline(), gather_s=0.0) as scheduler:
        assert scheduler.max_queued_images == 24
    with Scheduler(FakePipeline(), max_queued_images=5, gather_s=0.0) as scheduler:
        assert scheduler.max_queued_images == 5


def test_the_handler_refuses_a_client_over_its_limit_and_releases_what_ends(tmp_path):
    hold = threading.Event()
    scheduler = ScriptedScheduler(hold=hold)
    h = make_handlers(tmp_path, scheduler)
    h.admission = Admission(max_images_per_client=12)

    async def scenario():
        running = asyncio.ensure_future(collect(h.generate("a red square", num_images=8)))
        while h.admission.waiting(LOCAL_CLIENT) != 8:
            await asyncio.sleep(0.01)
        with pytest.raises(gr.Error) as info:
            await collect(h.generate("a blue circle", num_images=8))
        assert info.value.message == ("You already have 8 images waiting (at most 12 per visitor); "
                                      "try again when they are done.")
        assert len(scheduler.jobs) == 1  # the refused request never reached the scheduler
        hold.set()
        return await running

    assert run(scenario())[-1][1]["status"] == "done"
    assert h.admission.waiting(LOCAL_CLIENT) == 0
    busy = make_handlers(tmp_path, ScriptedScheduler("full"))
    with pytest.raises(gr.Error) as info:
        run(collect(busy.generate("a red square", num_images=4)))
    assert info.value.message == BUSY_MESSAGE  # the server's own bound: a different message
    assert busy.admission.waiting(LOCAL_CLIENT) == 0


# ---- round-robin loops ------------------------------------------------------------------------

def _loops(pipe: FakePipeline) -> list[list[tuple[str, int]]]:
    return [[(r.request.prompt, r.seed) for r in loop] for loop in pipe.loops]


def test_loops_take_images_round_robin_across_clients_oldest_first():
    pipe = FakePipeline()
    pipe.gate.clear()
    with Scheduler(pipe, max_batch_images=4, progress_every=2, preview_every=0, gather_s=0.0) as scheduler:
        warm = scheduler.submit(GenerationRequest("warm", num_images=1, seed=0, client="w"))
        assert pipe.started.wait(5)  # the worker is busy: the rest waits together
        greedy = [scheduler.submit(GenerationRequest(f"g{i}", num_images=4, seed=10 * i, client="g"))
                  for i in range(1, 4)]
        a = scheduler.submit(GenerationRequest("a", num_images=1, seed=100, client="a"))
        b = scheduler.submit(GenerationRequest("b", num_images=1, seed=200, client="b"))
        c = scheduler.submit(GenerationRequest("c", num_images=2, seed=300, client="c"))
        dropped = scheduler.submit(GenerationRequest("d", num_images=1, seed=400, client="d"))
        dropped.cancel()
        pipe.gate.set()
        outputs = {job.request.prompt: job.result(10) for job in [warm, *greedy, a, b, c]}
    assert _loops(pipe) == [
        [("warm", 0)],
        [("g1", 10), ("a", 100), ("b", 200), ("c", 300)],  # one image per client in turn
        [("g1", 11), ("g1", 12), ("g1", 13), ("c", 301)],  # loops stay full (a job's rows side by side)
        [("g2", 20), ("g2", 21), ("g2", 22), ("g2", 23)],
        [("g3", 30), ("g3", 31), ("g3", 32), ("g3", 33)],
    ]
    for job in greedy:  # a request split over loops still gets all its own images
        assert sorted(g.seed for g in outputs[job.request.prompt].images[0]) == list(
            range(job.request.seed, job.request.seed + 4))


def test_queue_positions_follow_the_round_robin():
    pipe = FakePipeline()
    pipe.gate.clear()
    with Scheduler(pipe, max_batch_images=4, progress_every=2, preview_every=0, gather_s=0.0) as scheduler:
        scheduler.submit(GenerationRequest("warm", num_images=1, seed=0, client="w"))
        assert pipe.started.wait(5)
        greedy = [scheduler.submit(GenerationRequest(f"g{i}", num_images=4, seed=i, client="g")) for i in range(3)]
        newcomer = scheduler.submit(GenerationRequest("new", num_images=1, seed=9, client="n"))
        positions = {job.request.prompt: next(job.events(timeout=5)).queue_position for job in [*greedy, newcomer]}
        pipe.gate.set()
        newcomer.result(10)
    # the newcomer starts right after the greedy client's first request, not after all three
    assert positions == {"g0": 0, "g1": 1, "g2": 2, "new": 1}


def test_the_queue_bound_counts_waiting_images():
    pipe = FakePipeline()
    pipe.gate.clear()
    with Scheduler(pipe, max_queued_images=6, progress_every=2, gather_s=0.0) as scheduler:
        running = scheduler.submit(GenerationRequest("run", num_images=4, seed=1))  # decoding: not waiting
        assert pipe.started.wait(5)
        waiting = [scheduler.submit(GenerationRequest("w", num_images=4, seed=2, client="x")),
                   scheduler.submit(GenerationRequest("w", num_images=2, seed=3, client="y"))]
        with pytest.raises(QueueFullError, match=r"busy \(6 images waiting\)"):
            scheduler.submit(GenerationRequest("one more", num_images=1, client="z"))
        pipe.gate.set()
        for job in [running, *waiting]:
            job.result(10)
        scheduler.submit(GenerationRequest("after", num_images=6, client="z")).result(10)


# ---- a greedy client and polite ones on the real server ---------------------------------------

GREEDY_REQUESTS, GREEDY_IMAGES, LIMIT = 6, 4, 16  # the greedy client can have 4 requests in
POLITE = 3
LOOP_IMAGES = 4


class LoopLog(SlowPipeline):
    """The real tiny pipeline, gated like SlowPipeline, remembering whose images each loop held."""

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline, 0.05)
        self.loops: list[list[tuple[str, str]]] = []

    def generate_codes(self, rows, progress=None, progress_every=None, steps=None):
        self.loops.append([(r.request.client, r.request.prompt) for r in rows])
        return super().generate_codes(rows, progress, progress_every, steps)


class Watched(Scheduler):
    """A Scheduler that notes, for each job, how many loops had started when it arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[object, int]] = []

    def submit(self, request):
        started = len(self.pipeline.loops)
        job = super().submit(request)
        self.arrivals.append((job, started))
        return job


@pytest.fixture(scope="module")
def fair_server(tmp_path_factory):
    from dalle_app.pipeline import DallePipeline

    root = tmp_path_factory.mktemp("fair")
    parts = make_tiny_models(root / "tiny")
    catalog = Catalog([check_entry(ModelEntry("tiny", "Tiny random", parts), describe_availability)], "tiny")
    pipeline = DallePipeline.from_pretrained(**parts, warmup=(1, LOOP_IMAGES))

    def load(entry):
        return Watched(LoopLog(pipeline), max_batch_images=LOOP_IMAGES, progress_every=4, preview_every=0,
                       gather_s=0.1)

    pool = ModelPool(catalog, load)
    with pytest.MonkeyPatch.context() as env:  # the operator's knob, as `python app.py` reads it
        env.setenv(MAX_IMAGES_PER_CLIENT_ENV, str(LIMIT))
        handlers = Handlers(catalog, pool, grid_dir=root / "grids")
    demo = build_app(catalog, pool, handlers=handlers)
    with serve(demo) as url:
        yield url, pool.get("tiny")


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


def test_a_greedy_client_cannot_starve_polite_ones(fair_server):
    url, scheduler = fair_server
    pipe = scheduler.pipeline
    greedy = Client(url, verbose=False)  # one session: one client, however many requests it sends
    polite = [Client(url, verbose=False) for _ in range(POLITE)]
    try:
        pipe.gate.clear()  # hold the first loop so that everything below queues behind it
        before = len(scheduler.arrivals)
        greedy_jobs = [greedy.submit(prompt=f"a red square {i}", num_images=GREEDY_IMAGES, seed=100 * i,
                                     api_name="/generate") for i in range(GREEDY_REQUESTS)]
        admitted = LIMIT // GREEDY_IMAGES
        _wait(lambda: len(scheduler.arrivals) - before == admitted
              and sum(j.done() for j in greedy_jobs) == GREEDY_REQUESTS - admitted)
        polite_jobs = [c.submit(prompt=f"a blue circle {i}", num_images=1, seed=7 + i, api_name="/generate")
                       for i, c in enumerate(polite)]
        _wait(lambda: len(scheduler.arrivals) - before == admitted + POLITE)
        pipe.gate.set()

        refused, completed = [], []
        for i, job in enumerate(greedy_jobs):
            try:
                completed.append((i, job.result(timeout=300)))
            except AppError as e:
                refused.append(str(e))
        polite_results = [job.result(timeout=300) for job in polite_jobs]
    finally:
        pipe.gate.set()
        for c in [greedy, *polite]:
            c.close()

    # the greedy client: its extra requests told its limit, every accepted one complete and its own
    assert refused == [f"You already have {LIMIT} images waiting (at most {LIMIT} per visitor); "
                       "try again when they are done."] * (GREEDY_REQUESTS - admitted)
    assert len(completed) == admitted
    for i, (gallery, summary) in completed:
        assert summary["prompt"] == f"a red square {i}" and len(gallery) == GREEDY_IMAGES
        assert sorted(summary["seeds"]) == list(range(100 * i, 100 * i + GREEDY_IMAGES))
    # every polite request completes, with its own image
    for i, (gallery, summary) in enumerate(polite_results):
        assert summary["prompt"] == f"a blue circle {i}" and summary["seeds"] == [7 + i] and len(gallery) == 1
    # ... decoded in the first loop that started after it arrived, ahead of the greedy backlog
    for job, started in scheduler.arrivals[before:]:
        if job.request.prompt.startswith("a blue circle"):
            loops = [n for n, loop in enumerate(pipe.loops) if (job.request.client, job.request.prompt) in loop]
            assert loops == [started], (job.request.prompt, started, pipe.loops[started - 1:])
    greedy_loops = [n for n, loop in enumerate(pipe.loops) if any(p.startswith("a red square") for _, p in loop)]
    assert greedy_loops[-1] > max(started for _, started in scheduler.arrivals[before:])  # backlog still queued


def test_visitors_behind_a_proxy_are_keyed_by_their_forwarded_address(fair_server):
    url, scheduler = fair_server
    pipe = scheduler.pipeline
    first = Client(url, verbose=False, headers={"X-Forwarded-For": PUBLIC_A})
    same = Client(url, verbose=False, headers={"X-Forwarded-For": f"{PUBLIC_B}, {PUBLIC_A}"})  # a forged entry
    other = Client(url, verbose=False, headers={"X-Forwarded-For": PUBLIC_B})
    try:
        pipe.gate.clear()
        before = len(scheduler.arrivals)
        big = first.submit(prompt="a green star", num_images=LIMIT, seed=1, api_name="/generate")
        _wait(lambda: len(scheduler.arrivals) - before == 1)
        with pytest.raises(AppError, match=f"You already have {LIMIT} images waiting"):
            same.predict(prompt="a green star", num_images=1, seed=2, api_name="/generate")
        small = other.submit(prompt="a pink cross", num_images=1, seed=3, api_name="/generate")
        _wait(lambda: len(scheduler.arrivals) - before == 2)
        pipe.gate.set()
        assert len(big.result(timeout=300)[0]) == LIMIT
        assert small.result(timeout=300)[1]["seeds"] == [3]
    finally:
        pipe.gate.set()
        for c in (first, same, other):
            c.close()
    assert [job.request.client for job, _ in scheduler.arrivals[before:]] == [f"ip:{PUBLIC_A}", f"ip:{PUBLIC_B}"]
