"""The real server (in this process, on a free loopback port) called through gradio_client.

Models: the tiny random set ("tiny"), the same behind a slowed-down scheduler ("slow", so a test
can cancel mid-loop), one with a one-place queue ("tight"), and broken copies for fault
injection: a corrupt msgpack, a missing file, a file that vanishes after startup, an offline repo.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image

from dalle_app.catalog import Catalog, ModelEntry, ModelPool, check_entry
from dalle_app.hub import describe_availability
from dalle_app.scheduler import JobCancelled
from dalle_app.images import read_codes
from dalle_app.ui import BUSY_MESSAGE, Handlers, build_app
from dalle_app.uploads import MAX_UPLOAD_BYTES
from tests.app_support import (
    OutOfMemoryPipeline, SlowPipeline, bomb_png, make_tiny_models, read_metadata, recording_scheduler, serve,
)

pytestmark = pytest.mark.timeout(600)


def broken_copy(parts: dict[str, str], root: Path, name: str) -> dict[str, str]:
    folder = root / name
    shutil.copytree(parts["dalle"], folder)
    return parts | {"dalle": str(folder)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    parts = make_tiny_models(root / "tiny")
    corrupt = broken_copy(parts, root, "corrupt")
    weights = Path(corrupt["dalle"]) / "flax_model.msgpack"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    missing = broken_copy(parts, root, "missing")
    (Path(missing["dalle"]) / "tokenizer.json").unlink()
    vanished = broken_copy(parts, root, "vanished")
    entries = [
        ModelEntry("tiny", "Tiny random", parts),
        ModelEntry("slow", "Tiny, slowed down", parts),
        ModelEntry("tight", "Tiny, one-place queue", parts),
        ModelEntry("corrupt", "Corrupt msgpack", corrupt),
        ModelEntry("missing", "Missing tokenizer", missing),
        ModelEntry("vanished", "Weights deleted after startup", vanished),
        ModelEntry("oom2", "Out of memory beyond 2 images", parts),
        ModelEntry("oom0", "Out of memory always", parts),
        ModelEntry("offline", "Repo not in the cache", {"dalle": "nobody/not-downloaded", "vqgan": None, "clip": None}),
    ]
    catalog = Catalog([check_entry(e, describe_availability) for e in entries], "tiny")
    (Path(vanished["dalle"]) / "flax_model.msgpack").unlink()

    loaded = {}  # entries made of the same folders share one pipeline, as one compiled model

    def load(entry):
        from dalle_app.pipeline import DallePipeline

        parts = tuple(sorted(entry.parts.items()))
        if parts not in loaded:
            loaded[parts] = DallePipeline.from_pretrained(**entry.parts)
        pipeline = loaded[parts]
        if entry.name == "slow":
            return recording_scheduler(SlowPipeline(pipeline, 0.25), progress_every=4, preview_every=8, gather_s=0.3)
        if entry.name.startswith("oom"):
            return recording_scheduler(OutOfMemoryPipeline(pipeline, int(entry.name[3:])))
        if entry.name == "tight":
            return recording_scheduler(SlowPipeline(pipeline, 0.25), progress_every=4, max_queued_images=1,
                                       gather_s=0.0)
        return recording_scheduler(pipeline)

    pool = ModelPool(catalog, load)
    pool.get("tiny").pipeline.warmup((1, 2))
    demo = build_app(catalog, pool, handlers=Handlers(catalog, pool, grid_dir=root / "grids"))
    with serve(demo) as url:
        yield url, pool


@pytest.fixture(scope="module")
def client(server):
    c = Client(server[0], verbose=False)
    yield c
    c.close()


def generate(client, **kwargs):
    return client.predict(api_name="/generate", **kwargs)


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


def same_images(paths_a, paths_b) -> bool:
    """Same pixels, up to the VQGAN's float rounding across batch sizes (≤ 2 levels of 255)."""
    return len(paths_a) == len(paths_b) and all(
        np.abs(pixels(a) - pixels(b)).max() <= 2 for a, b in zip(paths_a, paths_b)
    )


def test_endpoint_is_named_and_every_argument_but_prompt_is_optional(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/generate", "/complete"]
    params = {p["parameter_name"]: p for p in api["named_endpoints"]["/generate"]["parameters"]}
    assert list(params) == ["prompt", "negative_prompt", "model", "num_images", "seed", "temperature", "top_k",
                            "top_p", "cond_scale", "seamless"]
    assert not params["prompt"]["parameter_has_default"]
    assert all(p["parameter_has_default"] for name, p in params.items() if name != "prompt")
    defaults = {name: p["parameter_default"] for name, p in params.items() if name != "prompt"}
    assert defaults == {"negative_prompt": None, "model": "tiny", "num_images": 9, "seed": -1, "temperature": 1.0,
                        "top_k": 50, "top_p": 1.0, "cond_scale": 10.0, "seamless": False}
    complete = [p["parameter_name"] for p in api["named_endpoints"]["/complete"]["parameters"]]
    assert complete == ["image", "prompt", "keep_rows", *list(params)[1:]]


def test_prompt_alone_gives_nine_ranked_images_with_captions(client):
    gallery, summary = generate(client, prompt="a red square above a blue circle")
    assert summary["prompt"] == "a red square above a blue circle" and summary["model"] == "tiny"
    assert len(gallery) == 9 == summary["num_images"] == len(summary["seeds"])
    assert summary["scores"] == sorted(summary["scores"], reverse=True)
    assert summary["parameters"] | {"seed": 0} == {
        "prompt": "a red square above a blue circle", "negative_prompt": "", "model": "tiny", "num_images": 9,
        "seed": 0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "cond_scale": 10.0, "seamless": False,
    }
    base = summary["parameters"]["seed"]
    assert sorted(summary["seeds"]) == [(base + i) % 2**31 for i in range(9)]
    for rank, (item, seed) in enumerate(zip(gallery, summary["seeds"]), start=1):
        assert item["caption"].startswith(f"#{rank} · CLIP ") and item["caption"].endswith(f"seed {seed}")
        meta = read_metadata(item["image"])  # the served PNG carries the parameters
        assert meta["prompt"] == summary["prompt"] and meta["seed"] == seed and meta["rank"] == rank
    assert {"encode_s", "generate_s", "total_s"} <= set(summary["timings"])


def test_seeds_are_reproducible_through_the_api(client):
    args = dict(prompt="a green star", num_images=2, seed=1234, temperature=0.9, top_k=20, cond_scale=3)
    first_gallery, first = generate(client, **args)
    second_gallery, second = generate(client, **args)
    assert first["seeds"] == second["seeds"] and sorted(first["seeds"]) == [1234, 1235]
    assert same_images([i["image"] for i in first_gallery], [i["image"] for i in second_gallery])
    # image i alone, from its own seed, is the same image
    one_gallery, one = generate(client, **(args | {"num_images": 1, "seed": first["seeds"][0]}))
    assert same_images([one_gallery[0]["image"]], [first_gallery[0]["image"]])


def test_partial_images_are_streamed_before_the_result(client):
    job = client.submit(prompt="a purple diamond", model="slow", num_images=2, seed=3, api_name="/generate")
    gallery, summary = job.result(timeout=120)
    outputs = job.outputs()
    statuses = [o[1].get("status") for o in outputs]
    assert statuses[0] == "queued" and statuses[-1] == "done" and "generating" in statuses
    previews = [o[0] for o in outputs if o[1].get("status") == "generating"]
    assert previews and all(item["caption"].startswith("preview ") for item in previews[0])
    assert len(gallery) == 2


BAD_INPUTS = [
    (dict(prompt=""), "Please enter a prompt"),
    (dict(prompt="   \n\t"), "Please enter a prompt"),
    (dict(prompt="\x00\x00"), "Please enter a prompt"),
    (dict(prompt="?!..."), "at least one letter or digit"),
    (dict(prompt=None), "Please enter a prompt"),
    (dict(prompt=12), "prompt must be text"),
    (dict(prompt="x", negative_prompt=["a"]), "negative prompt must be text"),
    (dict(prompt="x", num_images=0), "num_images must be a whole number from 1 to 16"),
    (dict(prompt="x", num_images=17), "num_images must be a whole number from 1 to 16"),
    (dict(prompt="x", num_images=-1), "num_images must be a whole number from 1 to 16"),
    (dict(prompt="x", num_images=2.5), "not a whole number"),
    (dict(prompt="x", num_images=10**15), "num_images must be"),
    (dict(prompt="x", num_images="9"), "num_images must be a whole number from 1 to 16 (got str '9')"),
    (dict(prompt="x", num_images=[1]), "got list"),
    (dict(prompt="x", temperature=0), "temperature must be a number greater than 0"),
    (dict(prompt="x", temperature=-2.0), "temperature must be a number greater than 0"),
    (dict(prompt="x", temperature=1e300), "at most 5"),
    (dict(prompt="x", top_k=0), "top_k must be a whole number from 1 to 16384"),
    (dict(prompt="x", top_k=50.5), "not a whole number"),
    (dict(prompt="x", top_p=0), "top_p must be a number greater than 0 and at most 1"),
    (dict(prompt="x", top_p=1.01), "top_p must be"),
    (dict(prompt="x", cond_scale=-1), "cond_scale must be a number from 1 to 30"),
    (dict(prompt="x", cond_scale={"a": 1}), "got dict"),
    (dict(prompt="x", seed=-5), "seed must be -1 (random) or a whole number from 0 to 2147483647"),
    (dict(prompt="x", seed=2**53), "seed must be -1 (random)"),
    (dict(prompt="x", seed="42"), "got str"),
    (dict(prompt="x", model="/etc/passwd"), "Unknown model '/etc/passwd'"),
    (dict(prompt="x", model="dalle-mini/dalle-mega"), "Unknown model"),
    (dict(prompt="x", model=["tiny"]), "model must be one of"),
    (dict(prompt="x", model="missing"), "cannot be used here"),
    (dict(prompt="x", model="offline"), "cannot be used here"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_get_a_clear_message_and_the_next_request_works(client, kwargs, message):
    with pytest.raises(AppError) as info:
        generate(client, **kwargs)
    assert message in str(info.value)
    gallery, summary = generate(client, prompt="a yellow circle", num_images=1)
    assert len(gallery) == 1 and summary["prompt"] == "a yellow circle"


def raw_call(url: str, body: str) -> str:
    """POST a hand-written JSON body (NaN, lone surrogates: what gradio_client cannot send)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        posted = http.post("/gradio_api/call/generate", content=body, headers={"content-type": "application/json"})
        posted.raise_for_status()
        return http.get(f"/gradio_api/call/generate/{posted.json()['event_id']}").text


@pytest.mark.parametrize("value,message", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")])
def test_nan_and_infinity_over_raw_http_are_rejected(server, value, message):
    body = '{"data": ["a red square", null, null, 1, -1, %s, 50, 1.0, 10.0, false]}' % value
    stream = raw_call(server[0], body)
    assert "event: error" in stream
    assert f"temperature must be a number greater than 0 and at most 5 (got {message})" in stream


def test_lone_surrogates_from_a_browser_are_dropped_with_a_notice(server):
    body = json.dumps({"data": ["a red square \\ud800", None, None, 1, 7, 1.0, 50, 1.0, 10.0, False]})
    body = body.replace("\\\\ud800", "\\ud800")  # a lone surrogate escape, as browsers send it
    stream = raw_call(server[0], body)
    assert "event: complete" in stream
    assert "a red square" in stream and "unpaired UTF-16 surrogates" in stream


def test_emoji_only_and_long_prompts_come_back_with_notices(client):
    _, summary = generate(client, prompt="🟥", num_images=1)
    assert summary["prompt"] == "red square" and "only emoji" in summary["notices"][0]
    _, summary = generate(client, prompt="a red square above a blue circle " * 20, num_images=1)
    assert any("longer than the model's text length" in n for n in summary["notices"])


def test_a_corrupt_checkpoint_fails_only_its_own_requests(client):
    with pytest.raises(AppError, match="Could not load model 'corrupt'.*corrupt"):
        generate(client, prompt="a red square", model="corrupt", num_images=1)
    with pytest.raises(AppError, match="Could not load model 'vanished'.*missing flax_model.msgpack"):
        generate(client, prompt="a red square", model="vanished", num_images=1)
    gallery, summary = generate(client, prompt="a red square", num_images=1)
    assert len(gallery) == 1 and summary["model"] == "tiny"


def test_out_of_memory_is_retried_smaller_then_reported(server, client):
    gallery, summary = generate(client, prompt="a red square", model="oom2", num_images=4, seed=8)
    assert len(gallery) == 4 and sorted(summary["seeds"]) == [8, 9, 10, 11]
    assert server[1].get("oom2").pipeline.loop_sizes == [4, 2, 2]
    with pytest.raises(AppError, match="Out of memory while generating: try fewer images"):
        generate(client, prompt="a red square", model="oom0", num_images=2)
    assert len(generate(client, prompt="a red square", num_images=1)[0]) == 1


def test_cancelling_one_request_leaves_the_others_in_its_batch_alone(server):
    url, pool = server
    scheduler = pool.get("slow")
    a, b = Client(url, verbose=False), Client(url, verbose=False)  # two users, one client each
    try:
        alone = b.predict(prompt="a blue circle", model="slow", num_images=2, seed=99, api_name="/generate")
        before = len(scheduler.jobs)
        job_a = a.submit(prompt="a red square", model="slow", num_images=2, seed=1, api_name="/generate")
        job_b = b.submit(prompt="a blue circle", model="slow", num_images=2, seed=99, api_name="/generate")
        deadline = time.monotonic() + 60
        while len(scheduler.jobs) < before + 2 or not any(o[1].get("status") == "generating" for o in job_a.outputs()):
            assert time.monotonic() < deadline, "the requests never started decoding"
            time.sleep(0.05)
        job_a.cancel()
        gallery, summary = job_b.result(timeout=120)
        assert summary["prompt"] == "a blue circle" and summary["seeds"] == alone[1]["seeds"]
        assert same_images([i["image"] for i in gallery], [i["image"] for i in alone[0]])
        server_a = next(j for j in scheduler.jobs[before:] if j.request.prompt == "a red square")
        with pytest.raises(JobCancelled):  # the server-side job was cancelled
            server_a.result(timeout=30)
        assert _wait(lambda: job_a.status().code == Status.CANCELLED)
    finally:
        a.close()
        b.close()


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_full_scheduler_queue_answers_busy(server):
    url, _ = server
    clients = [Client(url, verbose=False) for _ in range(4)]
    results: list[object] = [None] * 4

    def run(i):
        try:
            results[i] = clients[i].predict(prompt=f"a pink cross {i}", model="tight", num_images=1, seed=i,
                                            api_name="/generate")
        except AppError as e:
            results[i] = e

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        for c in clients:
            c.close()
    busy = [r for r in results if isinstance(r, AppError)]
    done = [r for r in results if isinstance(r, tuple)]
    assert busy and all(str(e) == BUSY_MESSAGE for e in busy)
    assert done and all(r[1]["prompt"] == f"a pink cross {r[1]['parameters']['seed']}" for r in done)
    assert len(busy) + len(done) == 4


STRAY_TEMP_FILE = str(Path(tempfile.gettempdir()) / "dalle_app_not_served.txt")


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", str(Path(__file__).resolve()), str(Path(__file__).resolve().parents[1] / "app.py"),
     str(Path(__file__).resolve().parents[1] / "assets"), "../../etc/passwd", STRAY_TEMP_FILE],
)
def test_only_generated_files_are_served(server, path):
    Path(STRAY_TEMP_FILE).write_text("private")  # in the temp dir, but never returned by the app
    with httpx.Client(base_url=server[0], timeout=30) as http:
        response = http.get(f"/gradio_api/file={path}")
    assert response.status_code in (403, 404), (path, response.status_code)


def test_uploads_are_limited(server):
    with httpx.Client(base_url=server[0], timeout=30) as http:
        response = http.post("/gradio_api/upload", files={"files": ("big.png", b"0" * (MAX_UPLOAD_BYTES + 1024))})
    assert response.status_code == 413 or "exceeds" in response.text.lower()


# ---- /complete and seamless (the tiny model draws a 4x4 code grid: keep_rows 1 to 3) ----------


def png_codes(path: str) -> tuple[int, ...]:
    with Image.open(path) as image:
        image.load()
        found = read_codes(image)
    assert found is not None, f"{path} carries no codes"
    return found[0]


def test_completing_a_generated_image_keeps_its_first_rows_of_codes(client):
    gallery, _ = generate(client, prompt="a red square", num_images=1, seed=5)
    start = gallery[0]["image"]
    original = png_codes(start)
    assert len(original) == 16
    gallery, summary = client.predict(handle_file(start), "a green star", 2, num_images=3, seed=9,
                                      api_name="/complete")
    assert summary["keep_rows"] == 2 and summary["status"] == "done" and len(gallery) == 3
    for item in gallery:
        assert png_codes(item["image"])[:8] == original[:8]
        meta = read_metadata(item["image"])
        assert meta["keep_rows"] == 2 and meta["prompt"] == "a green star"
        with open(start, "rb") as f:
            assert meta["start_image_sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_an_uploaded_picture_of_any_size_is_completed(client, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 140, 3), np.uint8)).save(path)
    gallery, summary = client.predict(handle_file(str(path)), "a blue circle", 2, num_images=2, api_name="/complete")
    assert summary["keep_rows"] == 2 and len(gallery) == 2
    kept = {png_codes(item["image"])[:8] for item in gallery}
    assert len(kept) == 1


def test_seamless_is_reported_and_in_the_metadata(client):
    gallery, summary = generate(client, prompt="a red square", num_images=1, seed=5, seamless=True)
    assert summary["seamless"] is True and read_metadata(gallery[0]["image"])["seamless"] is True


BAD_COMPLETIONS = [
    ("text", {}, "not a picture this app can read"),
    ("bomb", {}, "far more than 50 megapixels"),
    ("large", {}, "56.0 megapixels"),
    ("none", {}, "Please give an image"),
    ("good", {"keep_rows": 0}, "keep_rows must be a whole number from 1 to 3"),
    ("good", {"keep_rows": 4}, "got 4 (everything kept"),
    ("good", {"keep_rows": 9}, "from 1 to 3"),
    ("good", {"keep_rows": -1}, "got -1"),
    ("good", {"keep_rows": 1.5}, "not a whole number"),
    ("good", {"keep_rows": "2"}, "got str"),
    ("good", {"prompt": ""}, "Please enter a prompt"),
    ("good", {"seamless": "yes"}, "seamless must be true or false"),
]


@pytest.mark.parametrize("kind,kwargs,message", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completions_get_a_clear_message_and_the_next_request_works(client, tmp_path, kind, kwargs, message):
    files = {"text": b"hello, not a picture", "bomb": bomb_png(20_000, 20_000), "large": bomb_png(8_000, 7_000)}
    path = tmp_path / "start.png"
    if kind == "good":
        Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    elif kind in files:
        path.write_bytes(files[kind])
    image = None if kind == "none" else handle_file(str(path))
    args = {"prompt": "a red square", "keep_rows": 2, "num_images": 1} | kwargs
    with pytest.raises(AppError) as info:
        client.predict(image, api_name="/complete", **args)
    assert message in str(info.value)
    gallery, _ = generate(client, prompt="a yellow circle", num_images=1)
    assert len(gallery) == 1


def test_a_server_path_is_never_read_as_the_start_image(server):
    body = json.dumps({"data": [{"path": str(Path(__file__).resolve().parents[1] / "docs" / "app_screenshot.png")},
                                "a red square", 2, None, None, 1, -1, None, None, None, None, False]})
    with httpx.Client(base_url=server[0], timeout=60) as http:
        posted = http.post("/gradio_api/call/complete", content=body, headers={"content-type": "application/json"})
        posted.raise_for_status()
        stream = http.get(f"/gradio_api/call/complete/{posted.json()['event_id']}").text
    assert "event: error" in stream and "event: complete" not in stream


def test_nan_keep_rows_over_raw_http_is_rejected(server, tmp_path):
    path = tmp_path / "start.png"
    Image.new("RGB", (16, 16), (30, 200, 30)).save(path)
    with httpx.Client(base_url=server[0], timeout=60) as http:
        files = http.post("/gradio_api/upload", files={"files": ("start.png", path.read_bytes())}).json()
        image = {"path": files[0], "meta": {"_type": "gradio.FileData"}}
        rest = 'NaN, null, null, 1, -1, null, null, null, null, false'
        body = '{"data": [%s, "a red square", %s]}' % (json.dumps(image), rest)
        posted = http.post("/gradio_api/call/complete", content=body, headers={"content-type": "application/json"})
        posted.raise_for_status()
        stream = http.get(f"/gradio_api/call/complete/{posted.json()['event_id']}").text
    assert "event: error" in stream and "keep_rows must be a whole number from 1 to 3" in stream and "got nan" in stream
