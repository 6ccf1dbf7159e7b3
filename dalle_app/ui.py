"""The Gradio 6 app: a prompt, a ranked gallery streamed while the codes come in, and `/generate`;
a second tab completes a picture from its top rows (`/complete`). Pictures that tile (`seamless`)
get a 2x2 tiling preview; any gallery image can be the start of a completion, with its own codes.

Event functions live on `Handlers` so tests can call them without a server. The generate event
is an async generator: Gradio cancels it (Stop button, client `job.cancel()`) by cancelling its
asyncio task, which lands in our `finally` and cancels the scheduler job, so a cancelled request
stops at once and the other requests decoded in the same batch go on undisturbed.

The endpoint runs with Gradio's preprocessing off: raw JSON values reach `validation.py`,
which checks every parameter in one place, for the UI, the API and the CLI alike.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal
from PIL import Image

from dalle_app import images as pngs
from dalle_app.catalog import Catalog, ModelLoadError, ModelPool
from dalle_app.request import DEFAULT_NUM_IMAGES, RANDOM_SEED, GenerationRequest
from dalle_app.scheduler import Job, JobEvent, QueueFullError, Scheduler
from dalle_app.uploads import MAX_UPLOAD_BYTES, start_completion
from dalle_app.validation import NUMBERS, ValidationError, validate_request

log = logging.getLogger(__name__)

BUSY_MESSAGE = "The server is busy: too many requests are waiting. Please try again in a minute."
CONCURRENCY = 256
"""Generate events running at once. A running event only awaits its scheduler job (no thread),
so this is well above the scheduler's own bound: every request reaches the scheduler, which
batches those waiting into its next decoding loop and answers BUSY_MESSAGE beyond its queue
(scheduler.MAX_QUEUE waiting jobs per model)."""
MAX_QUEUE = 64
"""Events Gradio holds beyond CONCURRENCY (a safety net; clients then see "Queue is full")."""
GRID_MAX_AGE_S = 900
"""Grid PNGs older than this are deleted (Gradio has copied them into its own cache by then)."""

EXAMPLES = [
    "a red square above a blue circle",
    "a green star to the left of a yellow triangle",
    "a big orange star on a plain background",
    "a pink cross and a cyan circle",
    "a purple diamond",
]

CSS = ".notice {font-size: 0.9em}"

SLIDER_STEP = 0.05
"""Step (and lowest value) of the temperature and top-p sliders; the API accepts any valid value."""
MAX_SLIDER_TEMPERATURE = 3.0
MAX_SLIDER_TOP_K = 1024
COND_SCALE_STEP = 0.5
KEEP_ROWS_MAX = 15
"""Largest keep_rows on the slider: the shipped models draw 16 code rows (the API checks each model's own grid)."""
DEFAULT_KEEP_ROWS = 8


def _error(message: str) -> gr.Error:
    """gr.Error renders HTML: escape whatever part of the user's input a message echoes."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


async def job_events(job: Job) -> AsyncIterator[JobEvent]:
    """The job's events, awaited without holding one of the event loop's executor threads.

    A small daemon thread per job drains the blocking `Job.events()` into an asyncio queue; it
    ends with the job's terminal event (a cancel posts one, so it never outlives its job).
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[JobEvent] = asyncio.Queue()

    def pump() -> None:
        for event in job.events():
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                job.cancel()
                return

    threading.Thread(target=pump, name="dalle-job-events", daemon=True).start()
    while True:
        event = await inbox.get()
        yield event
        if event.kind in ("done", "error", "cancelled"):
            return


def score_value(score: float) -> float | None:
    """A JSON-safe score: None when the model has no CLIP (the pipeline reports nan)."""
    value = float(score)
    return None if math.isnan(value) else round(value, 4)


def caption(rank: int, score: float | None, seed: int) -> str:
    clip = "CLIP n/a" if score is None else f"CLIP {score:.2f}"
    return f"#{rank} · {clip} · seed {seed}"


class Handlers:
    """The app's event functions, bound to a model catalog and its loaded schedulers."""

    def __init__(self, catalog: Catalog, pool: ModelPool, grid_dir: str | os.PathLike | None = None) -> None:
        self.catalog = catalog
        self.pool = pool
        self.grid_dir = Path(grid_dir or Path(tempfile.gettempdir()) / "dalle_app_grids")

    def validate(self, *values: Any) -> GenerationRequest:
        try:
            return validate_request(
                *values, models=self.catalog.usability(), default_model=self.catalog.default,
                recommended=self.catalog.recommended(),
            )
        except ValidationError as e:
            raise _error(str(e)) from None

    async def _scheduler(self, model: str) -> Scheduler:
        try:  # loading may take minutes: off the event loop, but a loaded model needs no thread
            return self.pool.loaded(model) or await asyncio.to_thread(self.pool.get, model)
        except ModelLoadError as e:
            raise _error(str(e)) from None

    async def _submit(self, request: GenerationRequest) -> Job:
        scheduler = await self._scheduler(request.model)
        try:
            return scheduler.submit(request)
        except QueueFullError:
            raise _error(BUSY_MESSAGE) from None
        except ValueError as e:  # the pipeline's own limits (e.g. a model's top-k range)
            raise _error(str(e)) from None

    async def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        model: str | None = None,
        num_images: int = DEFAULT_NUM_IMAGES,
        seed: int = RANDOM_SEED,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        cond_scale: float | None = None,
        seamless: bool = False,
        progress: gr.Progress = gr.Progress(),
    ) -> AsyncIterator[tuple[list[tuple[Image.Image, str]], dict[str, Any]]]:
        """Generate images for a prompt; yields the gallery (partial, then ranked) and a summary."""
        request = self.validate(
            prompt, negative_prompt, model, num_images, seed, temperature, top_k, top_p, cond_scale, seamless
        )
        async for update in self._run(request, progress):
            yield update

    async def complete(
        self,
        image: Any,
        prompt: str,
        keep_rows: int | None = DEFAULT_KEEP_ROWS,
        negative_prompt: str | None = None,
        model: str | None = None,
        num_images: int = DEFAULT_NUM_IMAGES,
        seed: int = RANDOM_SEED,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        cond_scale: float | None = None,
        seamless: bool = False,
        progress: gr.Progress = gr.Progress(),
    ) -> AsyncIterator[tuple[list[tuple[Image.Image, str]], dict[str, Any]]]:
        """Keep the top `keep_rows` code rows of `image` and draw the rest from the prompt; yields
        like `generate`. A PNG this app made starts from its own codes, any other picture from
        its VQGAN encoding."""
        request = self.validate(
            prompt, negative_prompt, model, num_images, seed, temperature, top_k, top_p, cond_scale, seamless
        )
        image = uploaded_file(image)
        scheduler = await self._scheduler(request.model)
        try:  # reading and encoding the picture is CPU work: off the event loop
            request = await asyncio.to_thread(start_completion, request, image, keep_rows, scheduler.pipeline.vqgan)
        except ValidationError as e:
            raise _error(str(e)) from None
        async for update in self._run(request, progress):
            yield update

    async def _run(self, request: GenerationRequest, progress: gr.Progress,
                   ) -> AsyncIterator[tuple[list[tuple[Image.Image, str]], dict[str, Any]]]:
        """Submit a checked request and stream its gallery and summary."""
        for notice in request.notices:
            gr.Warning(html.escape(notice, quote=False))
        job = await self._submit(request)
        finished = False
        try:
            summary = {**request.parameters(), "status": "queued", "notices": list(request.notices)}
            progress(0.0, desc="Waiting for the model")
            yield [], summary
            async for event in job_events(job):
                if event.kind == "queued":
                    ahead = event.queue_position or 0
                    progress(0.0, desc=f"Queued ({ahead} request(s) ahead)" if ahead else "Starting")
                elif event.kind == "progress":
                    progress((event.step, event.total), desc="Generating image tokens", unit="steps")
                    if event.partial_images:
                        partial = [(im, f"preview {event.step}/{event.total}") for im in event.partial_images]
                        yield partial, {**summary, "status": "generating", "step": event.step, "total": event.total}
                elif event.kind == "done":
                    finished = True
                    yield self._final(request, event)
                else:  # "error" or "cancelled": the job is over
                    finished = True
                    raise _error(event.error or "Generation failed.")
        except gr.Error:
            raise
        except Exception as e:  # a bug of ours must still end this request with a message, not a hang
            log.exception("request failed")
            raise _error(f"Generation failed unexpectedly ({type(e).__name__}); the details are in the server log.")
        finally:
            if not finished:
                job.cancel()

    def _final(self, request: GenerationRequest, event: JobEvent) -> tuple[list, dict[str, Any]]:
        output = event.result
        assert output is not None
        ranked = output.images[0]  # the pipeline ranks by CLIP score, best first
        notices = list(request.notices)
        if any(output.truncated):
            notices.append("The prompt is longer than the model's text length; its end was ignored.")
            gr.Warning(notices[-1])
        params = request.parameters()
        scores = [score_value(g.score) for g in ranked]
        gallery = [
            (
                pngs.with_metadata(g.image, params | {"seed": g.seed, "rank": rank, "score": score}, g.codes),
                caption(rank, score, g.seed),
            )
            for rank, (g, score) in enumerate(zip(ranked, scores), start=1)
        ]
        summary = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "model": request.model,
            "num_images": len(ranked),
            "seeds": [g.seed for g in ranked],
            "scores": scores,
            **({} if request.completion is None else {"keep_rows": request.completion.keep_rows}),
            "seamless": request.seamless,
            "parameters": params,
            "timings": {k: round(float(v), 4) for k, v in output.timings.items()},
            "notices": notices,
            "status": "done",
        }
        return gallery, summary

    def grid_download(self, gallery: list | None, summary: dict | None) -> Any:
        """Write the ranked gallery as one PNG (with the parameters) and offer it for download."""
        if not gallery or not summary or summary.get("status") != "done":
            return gr.DownloadButton(value=None, visible=False)
        tiles = [Image.open(item[0] if isinstance(item, (tuple, list)) else item) for item in gallery]
        meta = dict(summary.get("parameters") or {}) | {
            "seeds": summary.get("seeds", []),
            "scores": summary.get("scores", []),
        }
        self.grid_dir.mkdir(parents=True, exist_ok=True)
        self._prune_grids()
        path = self.grid_dir / f"dalle-grid-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.png"
        pngs.save_png(pngs.make_grid(tiles), path, meta)
        return gr.DownloadButton(value=str(path), visible=True)

    def _prune_grids(self) -> None:
        """Gradio copies each grid into its own cache; ours are only needed for a moment."""
        cutoff = time.time() - GRID_MAX_AGE_S
        for old in self.grid_dir.glob("dalle-grid-*.png"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass

    def tiling_preview(self, gallery: list | None, summary: dict | None, index: int | None) -> Any:
        """For seamless pictures: the selected (else the best) one tiled 2x2, to check the wrap."""
        if not gallery or not summary or summary.get("status") != "done" or not summary.get("seamless"):
            return gr.Image(value=None, visible=False)
        item = gallery[index if index is not None and 0 <= index < len(gallery) else 0]
        with Image.open(item[0] if isinstance(item, (tuple, list)) else item) as opened:
            picture = opened.convert("RGB")
        tiled = Image.new("RGB", (2 * picture.width, 2 * picture.height))
        for x in (0, picture.width):
            for y in (0, picture.height):
                tiled.paste(picture, (x, y))
        return gr.Image(value=tiled, visible=True)

    def complete_from(self, gallery: list | None, index: int | None, prompt: str | None) -> tuple[Any, Any, Any]:
        """Start a completion from a gallery image (its PNG carries its codes): opens the tab."""
        if not gallery:
            raise _error("Generate images first, then choose one in the gallery to complete.")
        item = gallery[index if index is not None and 0 <= index < len(gallery) else 0]
        path = item[0] if isinstance(item, (tuple, list)) else item
        return gr.Tabs(selected="complete"), path, prompt or ""

    def model_status(self, model: str | None) -> str:
        """The line under the model choice: what the chosen model is, or why it cannot be used."""
        entry = self.catalog.entries.get(model or self.catalog.default)
        if entry is None:
            return "Unknown model."
        if not entry.available:
            return f"⚠️ **{entry.name}** cannot be used here: {html.escape(entry.reason, quote=False)}"
        note = f" ({html.escape(entry.note, quote=False)})" if entry.note else ""
        return f"Model **{entry.name}**: {html.escape(entry.label, quote=False)}{note}"

    def model_changed(self, model: str | None) -> tuple[str, float, int, float, float]:
        """On a new model choice: its status line, and the sliders set to its recommended settings."""
        d = self.catalog.sampling_defaults(model or self.catalog.default)
        return self.model_status(model), d.temperature, d.top_k, d.top_p, d.cond_scale


def uploaded_file(value: Any) -> Any:
    """The path of an image the app received: only files in Gradio's upload folder (what the
    browser and gradio_client upload, and the gallery's own images), never another server path."""
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, (str, os.PathLike)) and str(path).strip():
        if not is_in_or_equal(str(path), get_upload_folder()):
            raise _error("The image must be uploaded with the request (a file from elsewhere on the server "
                         "is not read).")
        return str(path)
    return value  # None, empty or not a file: read_upload says what is wrong


def selected_index(event: gr.SelectData) -> int:
    """Which gallery image the user clicked (for the tiling preview and "complete")."""
    return int(event.index)


def availability_markdown(catalog: Catalog) -> str:
    lines = [f"- **{e.name}** — unavailable: {html.escape(e.reason, quote=False)}" for e in catalog.unavailable()]
    return "Models that cannot be used here:\n" + "\n".join(lines) if lines else ""


def build_app(catalog: Catalog, pool: ModelPool, *, handlers: Handlers | None = None) -> gr.Blocks:
    """The Blocks app (queue configured); launch it with `launch_kwargs()`."""
    h = handlers or Handlers(catalog, pool)
    n, k, p, c = (NUMBERS[x] for x in ("num_images", "top_k", "top_p", "cond_scale"))
    start = catalog.sampling_defaults(catalog.default)  # the default model's recommended settings
    with gr.Blocks(title="DALL·E Mini", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# DALL·E Mini\nType a prompt and press **Enter** or **Generate**. Images are ranked by CLIP; "
            "each caption gives its score and seed."
        )
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="generate-tab"):
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(
                        label="Prompt", placeholder=EXAMPLES[0], lines=1, max_lines=1, scale=5,
                        max_length=None, autofocus=True, elem_id="prompt",
                    )
                    run = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="stop")
            with gr.Tab("Complete an image", id="complete", elem_id="complete-tab"):
                gr.Markdown("Keep the top rows of a picture and let the model draw the rest from the prompt.")
                with gr.Row():
                    start_image = gr.Image(label="Start image", type="filepath", format="png",
                                           sources=["upload", "clipboard"], height=300, elem_id="start-image")
                    with gr.Column():
                        complete_prompt = gr.Textbox(label="Completion prompt", placeholder=EXAMPLES[0], lines=1,
                                                     max_lines=1, max_length=None, elem_id="complete-prompt")
                        keep_rows = gr.Slider(1, KEEP_ROWS_MAX, value=DEFAULT_KEEP_ROWS, step=1,
                                              label="Rows of codes to keep from the top", elem_id="keep-rows")
                        with gr.Row():
                            complete_run = gr.Button("Complete", variant="primary", elem_id="complete")
                            complete_stop = gr.Button("Stop", variant="stop", min_width=90, elem_id="complete-stop")
        with gr.Accordion("Advanced settings", open=False):
            negative = gr.Textbox(label="Negative prompt", placeholder="what the images should not show",
                                  lines=1, max_lines=2)
            with gr.Row():
                model = gr.Dropdown(choices=catalog.choices(), value=catalog.default, label="Model",
                                    elem_id="model", scale=2)
                num_images = gr.Slider(n.minimum, n.maximum, value=n.default, step=1, label="Number of images")
                seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed (-1 = random)")
                seamless = gr.Checkbox(False, label="Tileable (seamless) images", elem_id="seamless")
            model_info = gr.Markdown(h.model_status(catalog.default), elem_classes="notice")
            gr.Markdown(availability_markdown(catalog), elem_classes="notice")
            with gr.Row():
                temperature = gr.Slider(SLIDER_STEP, MAX_SLIDER_TEMPERATURE, value=start.temperature,
                                        step=SLIDER_STEP, label="Temperature")
                top_k = gr.Slider(k.minimum, MAX_SLIDER_TOP_K, value=start.top_k, step=1, label="Top-k")
                top_p = gr.Slider(SLIDER_STEP, p.maximum, value=start.top_p, step=SLIDER_STEP, label="Top-p")
                cond_scale = gr.Slider(c.minimum, c.maximum, value=start.cond_scale, step=COND_SCALE_STEP,
                                       label="Condition scale")
        gallery = gr.Gallery(
            label="Results (ranked by CLIP)", columns=4, height=740, object_fit="contain",
            format="png", elem_id="gallery", buttons=["download", "fullscreen"], interactive=False,
        )
        selected = gr.State(None)
        with gr.Row():
            complete_from = gr.Button("Complete the selected image", size="sm", elem_id="complete-from")
            download = gr.DownloadButton("Download grid (PNG)", visible=False, elem_id="download-grid")
        tiling = gr.Image(label="Tiling preview (2x2)", visible=False, interactive=False, format="png",
                          elem_id="tiling")
        with gr.Accordion("Details", open=False):
            summary = gr.JSON(label="Summary", elem_id="summary")
        gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Examples")

        settings = [negative, model, num_images, seed, temperature, top_k, top_p, cond_scale, seamless]
        hide = (lambda: (gr.DownloadButton(visible=False), gr.Image(visible=False), None),
                None, [download, tiling, selected])
        started = gr.on([run.click, prompt.submit], *hide, queue=False, api_visibility="private")
        generating = started.then(
            h.generate, [prompt, *settings], [gallery, summary], api_name="generate",
            api_description="Generate images for a prompt; returns the CLIP-ranked gallery and a JSON summary.",
            preprocess=False, concurrency_limit=CONCURRENCY, concurrency_id="generate",
        )
        complete_started = gr.on([complete_run.click, complete_prompt.submit], *hide, queue=False,
                                 api_visibility="private")
        completing = complete_started.then(
            h.complete, [start_image, complete_prompt, keep_rows, *settings], [gallery, summary],
            api_name="complete",
            api_description="Keep the top keep_rows code rows of an image and draw the rest from the prompt; "
                            "returns the CLIP-ranked gallery and a JSON summary, like /generate.",
            preprocess=False, concurrency_limit=CONCURRENCY, concurrency_id="generate",
        )
        for event in (generating, completing):
            event.success(h.grid_download, [gallery, summary], download, api_visibility="private")
            event.success(h.tiling_preview, [gallery, summary, selected], tiling, api_visibility="private")
        stop.click(None, None, None, cancels=[generating])
        complete_stop.click(None, None, None, cancels=[completing])
        gallery.select(selected_index, None, selected, queue=False, api_visibility="private").then(
            h.tiling_preview, [gallery, summary, selected], tiling, api_visibility="private")
        complete_from.click(h.complete_from, [gallery, selected, prompt], [tabs, start_image, complete_prompt],
                            api_visibility="private")
        model.change(h.model_changed, model, [model_info, temperature, top_k, top_p, cond_scale],
                     api_visibility="private", queue=False)
    demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """How the app is served: uploads only up to the start-image limit, no extra files exposed, monitoring off."""
    return dict(
        css=CSS,
        max_threads=CONCURRENCY,  # also Gradio's number of job slots: 40 would cap CONCURRENCY
        max_file_size=f"{MAX_UPLOAD_BYTES // 2**20}mb",  # start images of completions
        allowed_paths=[],
        enable_monitoring=False,
        show_error=False,
        footer_links=["api", "gradio", "settings"],
    )


def warmup_sizes(env: dict[str, str] | os._Environ = os.environ) -> tuple[int, ...]:
    """Image-batch sizes compiled before serving on top of the pipeline's own (1 and 9 images):
    $DALLE_APP_WARMUP, e.g. "4,16" (shared loops of several users reach 16)."""
    text = env.get("DALLE_APP_WARMUP", "")
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> None:
    """`python app.py`: load and warm the default model, then serve (127.0.0.1:7860 unless
    GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise)."""
    from dalle_app.catalog import load_scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests
    catalog = Catalog.from_env()
    pool = ModelPool(catalog, load_scheduler)
    started = time.perf_counter()
    print(f"Loading the default model {catalog.default!r}...", flush=True)
    try:
        scheduler = pool.get(catalog.default)
        sizes = warmup_sizes()
        if sizes:
            scheduler.pipeline.warmup(sizes)
        print(f"Model {catalog.default!r} ready in {time.perf_counter() - started:.1f} s", flush=True)
    except ModelLoadError as e:  # still serve: other models may work, and the error is shown per request
        log.error("the default model could not be loaded: %s", e)
    demo = build_app(catalog, pool)
    _, url, _ = demo.launch(prevent_thread_lock=True, **launch_kwargs())
    print(f"dalle_app is listening on {url}", flush=True)
    demo.block_thread()
