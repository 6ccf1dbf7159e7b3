"""The app's event functions, called directly (no server), against a scripted scheduler."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from dalle_app import images as pngs
from dalle_app import ui
from dalle_app.backend import BackendError
from dalle_app.catalog import Catalog, ModelEntry, ModelPool, check_entry, short_reason
from dalle_app.scheduler import JobEvent, QueueFullError
from dalle_app.ui import BUSY_MESSAGE, Handlers, build_app, caption
from dalle_app.uploads import Upload
from tests.app_support import read_metadata


def tile(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), value, np.uint8))


class ScriptedJob:
    """Plays a fixed list of events; `hold` makes it wait before the terminal one."""

    def __init__(self, request, events, hold: threading.Event | None = None):
        self.request, self._events, self.hold = request, events, hold
        self.cancelled = threading.Event()

    def events(self):
        for event in self._events:
            if event.kind in ("done", "error") and self.hold is not None:
                while not self.hold.wait(0.01):
                    if self.cancelled.is_set():
                        yield JobEvent("cancelled", error="cancelled")
                        return
            yield event

    def cancel(self):
        self.cancelled.set()


class FourByFourVQGAN:
    """Encodes every picture to the codes 0..15 of a 4x4 grid (64 codes in the codebook)."""

    config = SimpleNamespace(latent_size=4, num_codes=16, n_embed=64)

    def encode_images(self, images):
        return np.stack([np.arange(16, dtype=np.int32) for _ in images])


class ScriptedScheduler:
    pipeline = SimpleNamespace(vqgan=FourByFourVQGAN())

    def __init__(self, script="ok", hold=None):
        self.script, self.hold, self.jobs = script, hold, []

    def submit(self, request):
        if self.script == "full":
            raise QueueFullError("full")
        if self.script == "error":
            events = [JobEvent("queued"), JobEvent("error", error="Out of memory while generating: try fewer images")]
        else:
            n = request.num_images
            images = [SimpleNamespace(image=tile(10 * i), score=1.0 - 0.1 * i, seed=request.seed + n - i,
                                      codes=np.full(16, i, np.int32)) for i in range(n)]
            result = SimpleNamespace(images=[images], timings={"total_s": 0.5}, normalized=[" " + request.prompt],
                                     truncated=[False])
            events = [
                JobEvent("queued", queue_position=1),
                JobEvent("progress", step=8, total=16, partial_images=[tile(1), tile(2)]),
                JobEvent("progress", step=16, total=16),
                JobEvent("done", step=16, total=16, result=result),
            ]
        job = ScriptedJob(request, events, self.hold)
        self.jobs.append(job)
        return job


def describe_all_available(ref, kind):
    return True, f"{ref or 'embedded'} {kind} here"


def make_handlers(tmp_path, scheduler=None, load=None):
    catalog = Catalog.from_env({}, describe_all_available)
    broken = ModelEntry("broken", "broken", {"dalle": "x"}, available=False, reason="missing flax_model.msgpack")
    catalog = Catalog([*catalog.entries.values(), broken], catalog.default)
    pool = ModelPool(catalog, load or (lambda entry: scheduler))
    return Handlers(catalog, pool, grid_dir=tmp_path / "grids")


async def collect(agen):
    return [item async for item in agen]


def run(coro):
    return asyncio.run(coro)


def test_generate_streams_previews_then_the_ranked_gallery(tmp_path):
    scheduler = ScriptedScheduler()
    h = make_handlers(tmp_path, scheduler)
    outputs = run(collect(h.generate("a red square", num_images=4, seed=100)))
    first, preview, final = outputs
    assert first[0] == [] and first[1]["status"] == "queued" and first[1]["prompt"] == "a red square"
    assert [c for _, c in preview[0]] == ["preview 8/16", "preview 8/16"]
    gallery, summary = final
    scores = [s for s in summary["scores"]]
    assert scores == sorted(scores, reverse=True) and len(gallery) == 4
    assert summary["seeds"] == [104, 103, 102, 101]
    for rank, ((image, text), seed, score) in enumerate(zip(gallery, summary["seeds"], summary["scores"]), 1):
        assert text == caption(rank, score, seed)
        meta = __import__("json").loads(image.info[pngs.METADATA_KEY])
        assert meta["seed"] == seed and meta["prompt"] == "a red square" and meta["rank"] == rank
    assert summary["model"] == "embedded" and summary["timings"] == {"total_s": 0.5}
    # left-out sampling settings are the embedded model's recommended ones (its generation_config.json)
    assert summary["parameters"]["cond_scale"] == h.catalog.sampling_defaults("embedded").cond_scale == 1.5
    assert summary["status"] == "done"
    request = scheduler.jobs[0].request
    assert (request.prompt, request.num_images, request.seed, request.sampling.top_k) == ("a red square", 4, 100, 50)
    assert summary["parameters"] == request.parameters()  # the validated record, unchanged


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt="   "), "Please enter a prompt"),
        (dict(prompt="x", num_images=99), "num_images must be a whole number from 1 to 16"),
        (dict(prompt="x", model="/etc/passwd"), "Unknown model"),
        (dict(prompt="x", model="broken"), "missing flax_model.msgpack"),
        (dict(prompt="x", top_p="a<b>"), "top_p must be"),
    ],
)
def test_invalid_requests_raise_gr_error_with_the_reason(tmp_path, kwargs, message):
    h = make_handlers(tmp_path, ScriptedScheduler())
    with pytest.raises(gr.Error) as info:
        run(collect(h.generate(**kwargs)))
    assert message in info.value.message
    assert "<b>" not in info.value.message  # echoed input is escaped: gr.Error renders HTML


def test_full_queue_answers_busy(tmp_path):
    h = make_handlers(tmp_path, ScriptedScheduler("full"))
    with pytest.raises(gr.Error) as info:
        run(collect(h.generate("a red square")))
    assert info.value.message == BUSY_MESSAGE


def test_job_error_reaches_the_user(tmp_path):
    h = make_handlers(tmp_path, ScriptedScheduler("error"))
    with pytest.raises(gr.Error, match="Out of memory"):
        run(collect(h.generate("a red square")))


def test_model_load_failure_is_this_requests_error_only(tmp_path):
    calls = []

    def load(entry):
        calls.append(entry.name)
        if entry.name == "mini":
            raise OSError("flax_model.msgpack is corrupt")
        return ScriptedScheduler()

    h = make_handlers(tmp_path, load=load)
    with pytest.raises(gr.Error, match="Could not load model 'mini': flax_model.msgpack is corrupt"):
        run(collect(h.generate("a red square", model="mini")))
    assert run(collect(h.generate("a red square", num_images=1)))[-1][1]["status"] == "done"
    with pytest.raises(gr.Error):  # a failed load is retried, not cached
        run(collect(h.generate("a red square", model="mini")))
    assert calls == ["mini", "embedded", "mini"]


def test_closing_the_stream_cancels_the_job(tmp_path):
    """Gradio cancels the task of a stopped event; the generator's cleanup must cancel the job."""
    hold = threading.Event()
    scheduler = ScriptedScheduler(hold=hold)
    h = make_handlers(tmp_path, scheduler)

    async def start_then_stop():
        task = asyncio.ensure_future(collect(h.generate("a red square", num_images=2)))
        while not scheduler.jobs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(start_then_stop())
    assert scheduler.jobs[0].cancelled.wait(2)


def test_grid_download_writes_one_png_with_the_parameters(tmp_path):
    h = make_handlers(tmp_path, ScriptedScheduler())
    gallery, summary = run(collect(h.generate("a red square", num_images=3, seed=5)))[-1]
    paths = []
    for i, (image, text) in enumerate(gallery):
        path = tmp_path / f"{i}.png"
        image.save(path)
        paths.append((str(path), text))
    button = h.grid_download(paths, summary)
    path = button.value["path"] if isinstance(button.value, dict) else button.value
    meta = read_metadata(path)
    assert meta["prompt"] == "a red square" and meta["seeds"] == summary["seeds"] and meta["num_images"] == 3
    with Image.open(path) as grid:
        assert grid.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    assert h.grid_download([], None).visible is False


def test_catalog_marks_unavailable_models_and_adds_configured_folders():
    def describe(ref, kind):
        if ref in ("mega",):
            return False, "dalle-mini/dalle-mega@main is not in the local cache and offline mode is on"
        return True, "here"

    catalog = Catalog.from_env({"DALLE_APP_MODELS": " /models/a , owner/b@v1,,", "DALLE_APP_DEFAULT_MODEL": "mini"},
                               describe)
    assert list(catalog.entries) == ["embedded", "mini", "mega", "/models/a", "owner/b@v1"]
    assert catalog.default == "mini"
    assert catalog.usability()["mega"].startswith("dalle: dalle-mini/dalle-mega")
    assert dict((v, k) for k, v in catalog.choices())["mega"] == "DALL·E Mega (unavailable: not downloaded, offline)"
    with pytest.raises(ValueError, match="DALLE_APP_MODELS"):
        Catalog.from_env({"DALLE_APP_DEFAULT_MODEL": "nope"}, describe)


def test_check_entry_never_raises():
    def describe(ref, kind):
        raise RuntimeError("boom")

    entry = check_entry(ModelEntry("x", "x", {"dalle": "x"}), describe)
    assert not entry.available and "boom" in entry.reason
    assert short_reason("line one\nline two") == "line one"
    assert short_reason("dalle: model folder /x/assets/dalle-embedded does not exist") == "model files missing"


def test_model_status_line(tmp_path):
    h = make_handlers(tmp_path, ScriptedScheduler())
    assert "cannot be used here: missing flax_model.msgpack" in h.model_status("broken")
    assert "embedded" in h.model_status(None)


def test_sliders_follow_the_chosen_models_recommended_settings(tmp_path):
    catalog = Catalog.from_env({}, describe_all_available, lambda ref: {"cond_scale": 3.0} if ref is None else {})
    pool = ModelPool(catalog, lambda entry: ScriptedScheduler())
    h = Handlers(catalog, pool, grid_dir=tmp_path)
    assert h.model_changed("mini")[1:5] == (1.0, 50, 1.0, 10.0)
    assert h.model_changed("embedded")[1:5] == (1.0, 50, 1.0, 3.0)
    # the examples follow the model too: shapes for the embedded one, classic prompts for mini
    assert h.model_changed("embedded")[5].raw_samples[0] == ["a red square above a blue circle"]
    assert h.model_changed("mini")[5].raw_samples[0] == ["an armchair in the shape of an avocado"]
    demo = build_app(catalog, pool, handlers=h)
    sliders = {c.label: c.value for c in demo.blocks.values() if isinstance(c, gr.Slider)}
    assert (sliders["Condition scale"], sliders["Top-k"]) == (3.0, 50)


def test_app_exposes_the_generate_and_complete_endpoints(tmp_path):
    h = make_handlers(tmp_path, ScriptedScheduler())
    demo = build_app(h.catalog, h.pool, handlers=h)
    info = demo.get_api_info()
    assert list(info["named_endpoints"]) == ["/generate", "/complete"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    assert params == ["prompt", "negative_prompt", "model", "num_images", "seed", "temperature", "top_k",
                      "top_p", "cond_scale", "seamless"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/complete"]["parameters"]]
    assert params == ["image", "prompt", "keep_rows", "negative_prompt", "model", "num_images", "seed",
                      "temperature", "top_k", "top_p", "cond_scale", "seamless"]


def uploaded(tmp_path, monkeypatch, image, name="start.png"):
    """`image` saved where Gradio keeps uploads (here: a folder of the test's own)."""
    folder = tmp_path / "uploads"
    folder.mkdir(exist_ok=True)
    monkeypatch.setattr(ui, "get_upload_folder", lambda: str(folder))
    path = folder / name
    image.save(path)
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def test_complete_encodes_the_upload_and_reports_keep_rows(tmp_path, monkeypatch):
    scheduler = ScriptedScheduler()
    h = make_handlers(tmp_path, scheduler)
    image = uploaded(tmp_path, monkeypatch, Image.new("RGB", (30, 20), (1, 2, 3)))
    *_, (gallery, summary) = run(collect(h.complete(image, "a red square", 3, num_images=2, seed=4)))
    request = scheduler.jobs[0].request
    assert request.completion.codes == tuple(range(16)) and request.completion.keep_rows == 3
    assert summary["keep_rows"] == 3 and summary["parameters"]["keep_rows"] == 3
    with open(image["path"], "rb") as f:
        assert summary["parameters"]["start_image_sha256"] == __import__("hashlib").sha256(f.read()).hexdigest()
    assert gallery[0][0].info[pngs.CODES_KEY] == ",".join(["0"] * 16)  # the result's own codes travel along


def test_complete_from_a_generated_png_uses_its_own_codes(tmp_path, monkeypatch):
    scheduler = ScriptedScheduler()
    h = make_handlers(tmp_path, scheduler)
    image = uploaded(tmp_path, monkeypatch, tile(5))
    pngs.save_png(tile(5), image["path"], {"model": "embedded"}, [7] * 16)  # as the app writes its images
    run(collect(h.complete(image, "a red square", 2, num_images=1)))
    assert scheduler.jobs[0].request.completion.codes == (7,) * 16


@pytest.mark.parametrize("keep_rows,message", [(0, "from 1 to 3"), (4, "from 1 to 3"), (2.5, "not a whole number")])
def test_complete_refuses_bad_keep_rows(tmp_path, monkeypatch, keep_rows, message):
    h = make_handlers(tmp_path, ScriptedScheduler())
    image = uploaded(tmp_path, monkeypatch, tile(3))
    with pytest.raises(gr.Error) as info:
        run(collect(h.complete(image, "a red square", keep_rows)))
    assert message in info.value.message


def test_complete_reads_no_file_outside_the_upload_folder(tmp_path, monkeypatch):
    h = make_handlers(tmp_path, ScriptedScheduler())
    uploaded(tmp_path, monkeypatch, tile(3))
    elsewhere = tmp_path / "private.png"
    tile(9).save(elsewhere)
    for value in (str(elsewhere), {"path": str(elsewhere)}, {"path": str(tmp_path / "uploads" / ".." / "private.png")}):
        with pytest.raises(gr.Error, match="must be uploaded with the request"):
            run(collect(h.complete(value, "a red square", 2)))
    with pytest.raises(gr.Error, match="Please give an image"):
        run(collect(h.complete(None, "a red square", 2)))


def test_tiling_preview_and_complete_from_the_gallery(tmp_path):
    h = make_handlers(tmp_path, ScriptedScheduler())
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(first)
    picture = np.zeros((8, 8, 3), np.uint8)
    picture[:4] = 255
    Image.fromarray(picture).save(second)
    gallery = [(str(first), "#1"), (str(second), "#2")]
    hidden = h.tiling_preview(gallery, {"status": "done", "seamless": False}, None)
    assert hidden.visible is False
    shown = h.tiling_preview(gallery, {"status": "done", "seamless": True}, 1)
    tiled = np.asarray(shown.value if isinstance(shown.value, Image.Image) else Image.open(shown.value["path"]))
    assert shown.visible is True and tiled.shape == (16, 16, 3)
    np.testing.assert_array_equal(tiled[:8, :8], picture)
    np.testing.assert_array_equal(tiled[8:, 8:], picture)
    tabs, path, prompt = h.complete_from(gallery, 1, "a red square")
    assert path == str(second) and prompt == "a red square"
    with pytest.raises(gr.Error, match="Generate images first"):
        h.complete_from([], None, "x")


def test_warmup_sizes_and_the_unavailable_list(tmp_path):
    from dalle_app.ui import availability_markdown, warmup_sizes

    assert warmup_sizes({}) == () and warmup_sizes({"DALLE_APP_WARMUP": "4, 16"}) == (4, 16)
    h = make_handlers(tmp_path, ScriptedScheduler())
    text = availability_markdown(h.catalog)
    assert "**broken** — unavailable: missing flax_model.msgpack" in text and "embedded" not in text


def test_an_unexpected_failure_ends_the_request_with_a_message(tmp_path):
    class Broken(ScriptedScheduler):
        def submit(self, request):
            job = super().submit(request)
            job._events[-1] = JobEvent("done", result=SimpleNamespace(images="not a list"))
            return job

    h = make_handlers(tmp_path, Broken())
    with pytest.raises(gr.Error, match="Generation failed unexpectedly"):
        run(collect(h.generate("a red square", num_images=1)))


def test_complete_checks_the_picture_here_and_has_it_encoded_where_the_model_is(tmp_path, monkeypatch):
    """The handler reads and checks the upload itself, then hands the checked picture to the
    backend (e.g. Ray Serve replicas), whose errors reach the user as messages."""
    h = make_handlers(tmp_path, ScriptedScheduler())
    calls = []

    class Remote:
        async def start_completion(self, request, upload, keep_rows):
            calls.append((request, upload, keep_rows))
            raise BackendError("The model servers are not running (they failed to start): see the server log.")

    h.backend = Remote()
    with pytest.raises(gr.Error, match="model servers are not running"):
        run(collect(h.complete(uploaded(tmp_path, monkeypatch, tile(3)), "a red square", 2)))
    (request, upload, keep_rows), = calls
    assert isinstance(upload, Upload) and upload.image.size == (8, 8) and len(upload.sha256) == 64
    assert request.prompt == "a red square" and keep_rows == 2
    broken = tmp_path / "uploads" / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(gr.Error, match="not a picture this app can read"):
        run(collect(h.complete({"path": str(broken)}, "a red square", 2)))
    assert len(calls) == 1  # refused before reaching the backend

    class Full:
        async def start_completion(self, request, upload, keep_rows):
            raise QueueFullError("every replica is full")

    h.backend = Full()
    with pytest.raises(gr.Error, match=BUSY_MESSAGE[:30]):
        run(collect(h.complete(uploaded(tmp_path, monkeypatch, tile(3)), "a red square", 2)))
