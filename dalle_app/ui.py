"""The Gradio 6 app: a prompt, a ranked gallery streamed while the codes come in, and `/generate`;
a second tab completes a picture from its top rows (`/complete`). Pictures that tile (`seamless`)
get a 2x2 tiling preview; any gallery image can be the start of a completion, with its own codes.

Event functions live on `Handlers` so tests can call them without a server. The generate event
is an async generator: Gradio cancels it (Stop button, client `job.cancel()`) by cancelling its
asyncio task, which lands in our `finally` and cancels the scheduler job, so a cancelled request
stops at once and the other requests decoded in the same batch go on undisturbed.

The endpoint runs with Gradio's preprocessing off: raw JSON values reach `validation.py`,
which checks every parameter in one place, for the UI, the API and the CLI alike.

Each request is keyed by its client (`visitor_key`) and admitted through `admission.Admission`
before it reaches a scheduler: a client with too many images waiting is told so at once, and
the scheduler shares its decoding loops round-robin across clients.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal
from PIL import Image

from dalle_app import images as pngs
from dalle_app.admission import Admission, ClientLimitError, Ticket, client_key
from dalle_app.backend import Backend, BackendError, Generation, LocalBackend
from dalle_app.catalog import EMBEDDED, Catalog, ModelEntry, ModelLoadError, ModelPool
from dalle_app.request import DEFAULT_NUM_IMAGES, LOCAL_CLIENT, MAX_SEED, RANDOM_SEED, GenerationRequest
from dalle_app.scheduler import JobEvent, QueueFullError
from dalle_app.uploads import MAX_UPLOAD_BYTES, read_upload
from dalle_app.validation import NUMBERS, ValidationError, validate_request

log = logging.getLogger(__name__)

BUSY_MESSAGE = "The server is busy: too many requests are waiting. Please try again in a minute."
CONCURRENCY = 256
"""Generate events running at once. A running event only awaits its scheduler job (no thread),
so this is well above the scheduler's own bound: every request reaches the scheduler, which
batches those waiting into its next decoding loop and answers BUSY_MESSAGE beyond its queue
(scheduler.MAX_QUEUED_IMAGES waiting images per model)."""
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
"""Prompts the embedded model knows every word of (its world: coloured shapes and relations)."""
CLASSIC_EXAMPLES = [
    "an armchair in the shape of an avocado",
    "sunset over a lake in the mountains",
    "the Eiffel tower landing on the moon",
    "a watercolor painting of a fox in a snowy forest",
    "a snail made of harp",
]
"""Prompts in the spirit of DALL·E Mini's own demos, for models that learned from open captions."""

STATUS_REFRESH_S = 5.0
"""How often an open page checks whether a default model loading in the background is ready."""
GALLERY_TOP_PX = 360
"""Roughly where the gallery starts on the page (title, model line, prompt row, closed settings):
the gallery takes the rest of the window, and its grid is narrowed so that every row fits."""

CSS = f"""
.notice {{font-size: 0.9em}}
#gallery .grid-wrap {{overflow-y: auto}}
#gallery .caption-label {{font-size: 0.75em}}
#gallery .grid-container {{
  max-width: calc((100vh - {GALLERY_TOP_PX + 40}px) * var(--grid-cols) / var(--grid-rows));
  margin: 0 auto;
}}
"""
TITLE_JS = "(heading) => { document.title = heading.replace(/^#\\s*/, '').split('\\n')[0] + ' · dalle_app'; }"
"""Sets the browser tab's title from the page heading (the active model)."""

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


def visitor_key(request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str:
    """The client key of a Gradio request (`admission.client_key`): the user logged in through
    the app's `auth` or "Sign in with Hugging Face", else the visitor's address as Gradio
    reports it (behind a proxy, the forwarded one), else the browser session. Without a
    request (the handler called directly), LOCAL_CLIENT."""
    if request is None:
        return LOCAL_CLIENT
    username = getattr(request, "username", None) or (profile.username if profile is not None else None)
    peer = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    return client_key(username=username, host=getattr(peer, "host", None),
                      forwarded_for=headers.get("x-forwarded-for"), session=request.session_hash)


def score_value(score: float) -> float | None:
    """A JSON-safe score: None when the model has no CLIP (the pipeline reports nan)."""
    value = float(score)
    return None if math.isnan(value) else round(value, 4)


def caption(rank: int, score: float | None, seed: int) -> str:
    clip = "CLIP n/a" if score is None else f"CLIP {score:.2f}"
    return f"#{rank} · {clip} · seed {seed}"


class Handlers:
    """The app's event functions, bound to a model catalog and its loaded schedulers."""

    def __init__(self, catalog: Catalog, pool: ModelPool, grid_dir: str | os.PathLike | None = None,
                 machine_warning: str | None = None, *, admission: Admission | None = None,
                 backend: Backend | None = None) -> None:
        """`machine_warning` (hardware.gpu_backend_warning) is shown under the title; `admission`
        holds each client's images waiting, all models together (default: the limit from
        $DALLE_APP_MAX_IMAGES_PER_CLIENT). Requests go to `backend`, by default this process's
        pool (dalle_app.serve gives Ray Serve replicas)."""
        self.catalog = catalog
        self.pool = pool
        self.backend: Backend = backend or LocalBackend(pool)
        self.admission = admission or Admission.from_env()
        self.grid_dir = Path(grid_dir or Path(tempfile.gettempdir()) / "dalle_app_grids")
        self.machine_warning = machine_warning
        self._request_seconds: dict[str, float] = {}  # recent time per request, by model

    def validate(self, *values: Any, client: str = LOCAL_CLIENT) -> GenerationRequest:
        try:
            return validate_request(
                *values, models=self.catalog.usability(), default_model=self.pool.active_default(),
                recommended=self.catalog.recommended(), client=client,
            )
        except ValidationError as e:
            raise _error(str(e)) from None

    async def _start_completion(self, request: GenerationRequest, image: Any, keep_rows: Any) -> GenerationRequest:
        """The picture checked here (off the event loop), encoded where the model is loaded."""
        try:
            upload = await asyncio.to_thread(read_upload, image)
            return await self.backend.start_completion(request, upload, keep_rows)
        except (ValidationError, ModelLoadError, BackendError) as e:
            raise _error(str(e)) from None
        except QueueFullError:
            raise _error(BUSY_MESSAGE) from None

    def admit(self, request: GenerationRequest) -> Ticket:
        """Count the request's images against its client, or tell the user the client's limit."""
        try:
            return self.admission.admit(request.client, request.num_images)
        except ClientLimitError as e:
            raise _error(str(e)) from None

    async def _submit(self, request: GenerationRequest) -> Generation:
        try:
            return await self.backend.submit(request)
        except ModelLoadError as e:
            raise _error(str(e)) from None
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
        visitor: gr.Request | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> AsyncIterator[tuple[list[tuple[Image.Image, str]], dict[str, Any]]]:
        """Generate images for a prompt; yields the gallery (partial, then ranked) and a summary.

        Gradio fills in `visitor` (the HTTP request) and `profile` (the Hugging Face user, when
        the app offers a login): they say whose request it is."""
        request = self.validate(
            prompt, negative_prompt, model, num_images, seed, temperature, top_k, top_p, cond_scale, seamless,
            client=visitor_key(visitor, profile),
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
        visitor: gr.Request | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> AsyncIterator[tuple[list[tuple[Image.Image, str]], dict[str, Any]]]:
        """Keep the top `keep_rows` code rows of `image` and draw the rest from the prompt; yields
        like `generate`. A PNG this app made starts from its own codes, any other picture from
        its VQGAN encoding."""
        request = self.validate(
            prompt, negative_prompt, model, num_images, seed, temperature, top_k, top_p, cond_scale, seamless,
            client=visitor_key(visitor, profile),
        )
        request = await self._start_completion(request, uploaded_file(image), keep_rows)
        async for update in self._run(request, progress):
            yield update

    async def _run(self, request: GenerationRequest, progress: gr.Progress,
                   ) -> AsyncIterator[tuple[list[tuple[Image.Image, str]], dict[str, Any]]]:
        """Submit a checked request and stream its gallery and summary."""
        for notice in request.notices:
            gr.Warning(html.escape(notice, quote=False))
        ticket = self.admit(request)
        try:
            job = await self._submit(request)
        except BaseException:
            ticket.release()
            raise
        finished = False
        try:
            summary = {**request.parameters(), "status": "queued", "notices": list(request.notices)}
            progress(0.0, desc="Waiting for the model")
            yield [], summary
            async for event in job.events():
                if event.kind == "queued":
                    progress(0.0, desc=self.queue_message(request.model, event.queue_position or 0))
                elif event.kind == "progress":
                    progress((event.step, event.total), desc="Generating image tokens", unit="steps")
                    if event.partial_images:
                        partial = [(im, f"preview {event.step}/{event.total}") for im in event.partial_images]
                        yield partial, {**summary, "status": "generating", "step": event.step, "total": event.total}
                elif event.kind == "done":
                    finished = True
                    yield self._final(request, job, event)
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
            ticket.release()

    def queue_message(self, model: str, ahead: int) -> str:
        """What a waiting request is told: how many requests are ahead and, once this model has
        answered a request, about how long that is (requests ahead may share a loop: at most)."""
        if not ahead:
            return "Starting"
        seconds = self._request_seconds.get(model)
        wait = f", about {math.ceil(ahead * seconds)} s" if seconds else ""
        return f"Queued: {ahead} request(s) ahead{wait}"

    def _final(self, request: GenerationRequest, job: Generation, event: JobEvent) -> tuple[list, dict[str, Any]]:
        output = event.result
        assert output is not None
        seconds = float(output.timings.get("total_s", 0.0))
        if seconds > 0:  # a running average of this model's request time, for queue_message
            previous = self._request_seconds.get(request.model, seconds)
            self._request_seconds[request.model] = 0.7 * previous + 0.3 * seconds
        ranked = output.images[0]  # the pipeline ranks by CLIP score, best first
        read = self.catalog.text_notices(request.model, output.normalized[0], output.truncated[0])
        for notice in read:
            gr.Warning(html.escape(notice, quote=False))
        notices = [*request.notices, *read]
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
            "replica": job.replica,
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

    def model_changed(self, model: str | None) -> tuple[str, float, int, float, float, Any]:
        """On a new model choice: its status line, the sliders set to its recommended settings,
        and examples that suit it."""
        name = model or self.pool.active_default()
        d = self.catalog.sampling_defaults(name)
        samples = [[e] for e in examples_for(self.catalog, name)]
        return (self.model_status(model), d.temperature, d.top_k, d.top_p, d.cond_scale,
                gr.Dataset(samples=samples))

    def heading(self) -> str:
        """The page heading: the model that answers by default right now."""
        return f"# {short_label(self.catalog.entries[self.pool.active_default()])}"

    def active_model_line(self) -> str:
        """The line under the title: which model answers and why; for the embedded model, what it
        can draw and how to get DALL·E Mini or Mega; a GPU that JAX cannot use."""
        lines = [html.escape(self.pool.default_status(), quote=False)]
        if self.pool.active_default() == EMBEDDED:
            others = [e.label for e in self.catalog.entries.values() if e.available and e.name != EMBEDDED]
            switch = (f" For anything else choose {' or '.join(others)} under **Advanced settings → Model** "
                      "(downloaded on first use)." if others else "")
            lines.append("The embedded model is a small built-in model that draws coloured shapes (64×64), "
                         f"e.g. *{EXAMPLES[0]}*.{switch}")
        if self.machine_warning:
            lines.append(f"⚠️ {html.escape(self.machine_warning, quote=False)}")
        return "  \n".join(lines)

    def page_opened(self) -> tuple[str, str, str, float, int, float, float, Any, Any]:
        """A page was opened: heading, model line, and the model menu with its settings set to the
        model that answers now; the status timer runs while a default model is still loading."""
        name = self.pool.active_default()
        _, temperature, top_k, top_p, cond_scale, examples = self.model_changed(name)
        return (self.heading(), self.active_model_line(), self._menu(name), temperature, top_k, top_p,
                cond_scale, examples, gr.Timer(active=self.pool.default_loading()))

    def status_tick(self) -> tuple[str, str, Any]:
        """While the default model loads: refresh the heading and model line; once it is ready,
        select it in the model menu and stop the timer."""
        if self.pool.default_loading():
            return self.heading(), self.active_model_line(), gr.Dropdown()
        return self.heading(), self.active_model_line(), self._menu(self.pool.active_default())

    def _menu(self, name: str) -> Any:
        return gr.Dropdown(choices=self.catalog.choices(), value=name)

    def timer_state(self) -> Any:
        return gr.Timer(active=self.pool.default_loading())

    @staticmethod
    def before_generate(num_images: float | None, seed: float | None, randomize: bool) -> tuple[Any, Any, int]:
        """On Generate: hide the old grid download, lay the gallery out for the number of images
        asked for, and pick the seed to send (-1 when "Randomize seed" is ticked)."""
        count = int(num_images) if isinstance(num_images, (int, float)) and num_images >= 1 else 1
        columns, rows = pngs.grid_shape(count)
        use = RANDOM_SEED if randomize or seed is None else int(seed)
        return gr.DownloadButton(visible=False), gr.Gallery(columns=columns, rows=rows), use

    @staticmethod
    def seed_used(summary: dict | None) -> Any:
        """After a run, the seed it used (so one click on "Randomize seed" reuses it)."""
        seed = (summary or {}).get("parameters", {}).get("seed")
        return gr.Number() if seed is None else seed


def short_label(entry: ModelEntry) -> str:
    """A model's name without the details in parentheses: "Embedded default", "DALL·E Mini"."""
    return entry.label.split(" (", 1)[0]


def examples_for(catalog: Catalog, name: str) -> list[str]:
    """Example prompts that suit the model: shapes for the embedded one, classic prompts otherwise."""
    entry = catalog.entries.get(name)
    return EXAMPLES if entry is None or entry.parts.get("dalle") is None else CLASSIC_EXAMPLES


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


def build_app(catalog: Catalog, pool: ModelPool | None, *, handlers: Handlers | None = None) -> gr.Blocks:
    """The Blocks app (queue configured); launch it with `launch_kwargs()`. Without a pool, the
    handlers say where requests go (e.g. Ray Serve replicas)."""
    h = handlers or Handlers(catalog, pool)
    n, k, p, c = (NUMBERS[x] for x in ("num_images", "top_k", "top_p", "cond_scale"))
    active = pool.active_default()
    start = catalog.sampling_defaults(active)  # the active model's recommended settings
    columns, rows = pngs.grid_shape(int(n.default))
    with gr.Blocks(title=f"{short_label(catalog.entries[active])} · dalle_app", delete_cache=(600, 3600)) as demo:
        heading = gr.Markdown(h.heading(), elem_id="heading")
        active_line = gr.Markdown(h.active_model_line(), elem_id="active-model", elem_classes="notice")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="generate-tab"):
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(
                        label="Prompt", placeholder=examples_for(catalog, active)[0], lines=1, max_lines=1,
                        scale=5, max_length=None, autofocus=True, elem_id="prompt",
                    )
                    run = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", scale=0, min_width=90, elem_id="stop")
            with gr.Tab("Complete an image", id="complete", elem_id="complete-tab"):
                gr.Markdown("Keep the top rows of a picture and let the model draw the rest from the prompt.")
                with gr.Row():
                    start_image = gr.Image(label="Start image", type="filepath", format="png",
                                           sources=["upload", "clipboard"], height=300, elem_id="start-image")
                    with gr.Column():
                        complete_prompt = gr.Textbox(label="Completion prompt",
                                                     placeholder=examples_for(catalog, active)[0], lines=1,
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
                model = gr.Dropdown(choices=catalog.choices(), value=active, label="Model",
                                    elem_id="model", scale=2)
                num_images = gr.Slider(n.minimum, n.maximum, value=n.default, step=1, label="Number of images")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
                randomize = gr.Checkbox(value=True, label="Randomize seed", elem_id="randomize-seed")
                seamless = gr.Checkbox(False, label="Tileable (seamless) images", elem_id="seamless")
            model_info = gr.Markdown(h.model_status(active), elem_classes="notice")
            gr.Markdown(availability_markdown(catalog), elem_classes="notice")
            with gr.Row():
                temperature = gr.Slider(SLIDER_STEP, MAX_SLIDER_TEMPERATURE, value=start.temperature,
                                        step=SLIDER_STEP, label="Temperature")
                top_k = gr.Slider(k.minimum, MAX_SLIDER_TOP_K, value=start.top_k, step=1, label="Top-k")
                top_p = gr.Slider(SLIDER_STEP, p.maximum, value=start.top_p, step=SLIDER_STEP, label="Top-p")
                cond_scale = gr.Slider(c.minimum, c.maximum, value=start.cond_scale, step=COND_SCALE_STEP,
                                       label="Condition scale")
        gallery = gr.Gallery(
            label="Results (ranked by CLIP)", columns=columns, rows=rows, height=f"calc(100vh - {GALLERY_TOP_PX}px)",
            object_fit="contain", format="png", elem_id="gallery", buttons=["share", "download", "fullscreen"],
            interactive=False,
        )
        selected = gr.State(None)
        with gr.Row():
            complete_from = gr.Button("Complete the selected image", size="sm", elem_id="complete-from")
            download = gr.DownloadButton("Download grid (PNG)", visible=False, elem_id="download-grid")
        tiling = gr.Image(label="Tiling preview (2x2)", visible=False, interactive=False, format="png",
                          elem_id="tiling")
        with gr.Accordion("Details", open=False):
            summary = gr.JSON(label="Summary", elem_id="summary")
        examples = gr.Examples(examples=[[e] for e in examples_for(catalog, active)], inputs=[prompt],
                               label="Examples")
        request_seed = gr.Number(value=RANDOM_SEED, precision=0, visible=False)  # what /generate is sent
        status_timer = gr.Timer(STATUS_REFRESH_S, active=pool.default_loading())

        common = [negative, model, num_images, request_seed, temperature, top_k, top_p, cond_scale, seamless]
        gr.on([run.click, prompt.submit, complete_run.click, complete_prompt.submit],
              lambda: (gr.Image(visible=False), None), None, [tiling, selected], queue=False,
              api_visibility="private")
        started = gr.on(
            [run.click, prompt.submit], h.before_generate, [num_images, seed, randomize],
            [download, gallery, request_seed], queue=False, api_visibility="private",
        )
        generating = started.then(
            h.generate, [prompt, *common], [gallery, summary], api_name="generate",
            api_description="Generate images for a prompt; returns the CLIP-ranked gallery and a JSON summary.",
            preprocess=False, concurrency_limit=CONCURRENCY, concurrency_id="generate",
        )
        complete_started = gr.on(
            [complete_run.click, complete_prompt.submit], h.before_generate, [num_images, seed, randomize],
            [download, gallery, request_seed], queue=False, api_visibility="private",
        )
        completing = complete_started.then(
            h.complete, [start_image, complete_prompt, keep_rows, *common], [gallery, summary],
            api_name="complete",
            api_description="Keep the top keep_rows code rows of an image and draw the rest from the prompt; "
                            "returns the CLIP-ranked gallery and a JSON summary, like /generate.",
            preprocess=False, concurrency_limit=CONCURRENCY, concurrency_id="generate",
        )
        for event in (generating, completing):
            event.success(h.grid_download, [gallery, summary], download, api_visibility="private")
            event.success(h.seed_used, summary, seed, api_visibility="private", queue=False)
            event.success(h.tiling_preview, [gallery, summary, selected], tiling, api_visibility="private")
        stop.click(None, None, None, cancels=[generating])
        complete_stop.click(None, None, None, cancels=[completing])
        gallery.select(selected_index, None, selected, queue=False, api_visibility="private").then(
            h.tiling_preview, [gallery, summary, selected], tiling, api_visibility="private")
        complete_from.click(h.complete_from, [gallery, selected, prompt], [tabs, start_image, complete_prompt],
                            api_visibility="private")
        settings = [model_info, temperature, top_k, top_p, cond_scale, examples.dataset]
        model.change(h.model_changed, model, settings, api_visibility="private", queue=False)
        demo.load(h.page_opened, None, [heading, active_line, model, *settings[1:], status_timer],
                  api_visibility="private", queue=False).then(None, heading, None, js=TITLE_JS)
        status_timer.tick(h.status_tick, None, [heading, active_line, model], api_visibility="private",
                          queue=False).then(h.timer_state, None, status_timer, api_visibility="private",
                                            queue=False).then(None, heading, None, js=TITLE_JS)
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
    from dalle_app.catalog import EMBEDDED, load_scheduler
    from dalle_app.hardware import gpu_backend_warning, memory_budget_gb

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests
    warning = gpu_backend_warning()
    if warning:
        log.warning(warning)
    catalog = Catalog.from_env()
    pool = ModelPool(catalog, load_scheduler, budget_gb=memory_budget_gb())
    log.info("default model %r: %s", catalog.default, catalog.default_reason)
    # A default that may need a download or a long load is loaded behind the embedded model.
    first = EMBEDDED if catalog.default != EMBEDDED and EMBEDDED in catalog.entries else catalog.default
    started = time.perf_counter()
    print(f"Loading the model {first!r}...", flush=True)
    try:
        scheduler = pool.get(first)
        sizes = warmup_sizes()
        if sizes:
            scheduler.pipeline.warmup(sizes)
        print(f"Model {first!r} ready in {time.perf_counter() - started:.1f} s", flush=True)
    except ModelLoadError as e:  # still serve: other models may work, and the error is shown per request
        log.error("the model %r could not be loaded: %s", first, e)
    if first != catalog.default:
        pool.load_default_in_background()
    demo = build_app(catalog, pool, handlers=Handlers(catalog, pool, machine_warning=warning))
    _, url, _ = demo.launch(prevent_thread_lock=True, **launch_kwargs())
    print(f"dalle_app is listening on {url}", flush=True)
    demo.block_thread()
