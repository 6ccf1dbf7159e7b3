"""Request scheduler: one worker thread owns the device and batches users' requests together.

Why: generating is memory-bound (every decoder step reads all the weights once), so decoding
the images of several requests in one loop costs little more than decoding one request's.
Requests that are waiting when a loop starts share it; each request still gets its own
progress events, partial images and result, and can be cancelled without disturbing the rest.

Usage (e.g. from a Gradio handler):

    scheduler = Scheduler(pipeline)
    job = scheduler.submit(GenerationRequest(prompt="a red bus", num_images=4, seed=7))
    for event in job.events():
        if event.kind == "progress": show(event.step, event.total, event.partial_images)
        elif event.kind == "done": show_gallery(event.result.images[0])
        elif event.kind in ("error", "cancelled"): show_message(event.error)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
from PIL import Image

from dalle_app.pipeline import (
    DallePipeline,
    GenerationStopped,
    ImageSpec,
    PipelineOutput,
    check_settings,
    is_out_of_memory,
    random_seed,
)

log = logging.getLogger(__name__)

EventKind = Literal["queued", "progress", "done", "error", "cancelled"]


class QueueFullError(RuntimeError):
    """Raised by `Scheduler.submit` when `max_queue` jobs are already waiting."""


class JobCancelled(RuntimeError):
    """Raised by `Job.result` for a job that was cancelled."""


class JobFailed(RuntimeError):
    """Raised by `Job.result` for a job whose generation failed (the message says why)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One user's request: `num_images` images of `prompt`.

    Image i gets the seed `(seed + i) mod 2**31`, reported with each image, so any image can be
    regenerated alone. A negative `seed` means "pick one at random" (done at submit time, so the
    job reports the seed it used).
    """

    prompt: str
    negative_prompt: str = ""
    num_images: int = 9
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    cond_scale: float = 10.0


@dataclass(frozen=True)
class JobEvent:
    """What happened to a job.

    kind:
      "queued"    — accepted; `queue_position` jobs are ahead of it (0 = next).
      "progress"  — `step` of `total` decoder steps done; `partial_images` holds previews of
                    the images being decoded (at most `max_preview_images`, unfinished parts
                    grey) on preview steps, else None.
      "done"      — `result` is the job's PipelineOutput (one prompt, images ranked by CLIP).
      "error"     — `error` says what went wrong (e.g. out of memory); the job is over.
      "cancelled" — the job was cancelled; it is over.
    """

    kind: EventKind
    step: int = 0
    total: int = 0
    partial_images: list[Image.Image] | None = None
    result: PipelineOutput | None = None
    error: str | None = None
    queue_position: int | None = None


_TERMINAL = ("done", "error", "cancelled")


class Job:
    """Handle on a submitted request. Thread-safe; meant for one consumer of `events()`."""

    def __init__(self, request: GenerationRequest, rows: list[ImageSpec], total_steps: int,
                 scheduler: "Scheduler") -> None:
        self.request = request
        self.rows = rows
        self._total = total_steps
        self._scheduler = scheduler
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._final: JobEvent | None = None
        self._next_row = 0  # rows [0, _next_row) have been handed to a decoding loop
        self._codes: dict[int, np.ndarray] = {}
        self._row_steps: dict[int, int] = {}
        self.submitted_at = time.monotonic()

    # ---- public ---------------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The seed of image 0 (image i uses `(seed + i) mod 2**31`)."""
        return self.rows[0].seed

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._final is not None and self._final.kind == "cancelled"

    def events(self, timeout: float | None = None) -> Iterator[JobEvent]:
        """Yield the job's events in order, ending after its terminal event.

        `timeout` bounds the wait for each next event; TimeoutError is raised when it passes.
        """
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event from the job within {timeout} s") from None
            yield event
            if event.kind in _TERMINAL:
                return

    def result(self, timeout: float | None = None) -> PipelineOutput:
        """Wait for the job and return its output; raises JobFailed, JobCancelled or TimeoutError."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        final = self._final
        assert final is not None
        if final.kind == "done":
            assert final.result is not None
            return final.result
        if final.kind == "cancelled":
            raise JobCancelled("the job was cancelled")
        raise JobFailed(final.error or "generation failed")

    def cancel(self) -> None:
        """Stop the job: it gets a "cancelled" event and nothing after it.

        If its images are being decoded, those rows may finish the current loop (the other jobs
        in that loop are not disturbed) but are discarded; it is dropped from later loops.
        """
        if self._finish(JobEvent("cancelled", error="cancelled")):
            self._scheduler._forget(self)

    # ---- used by the scheduler ------------------------------------------------------------

    def _emit(self, event: JobEvent) -> None:
        with self._lock:
            if self._final is None:
                self._events.put(event)

    def _finish(self, event: JobEvent) -> bool:
        """Post the terminal event once; False if the job had already ended."""
        with self._lock:
            if self._final is not None:
                return False
            self._final = event
            self._events.put(event)
        self._finished.set()
        return True

    def _progress_step(self) -> int:
        """Decoder steps done, averaged over the job's images (so `total` is one loop's length)."""
        done = sum(self._row_steps.values())
        return min(self._total, done // len(self.rows))


@dataclass
class _Slot:
    """Rows of one job inside the current decoding loop."""

    job: Job
    rows: list[int]            # the job's row indices
    batch_rows: list[int] = field(default_factory=list)  # their positions in the loop's batch


class Scheduler:
    """Owns the pipeline through one worker thread; batches waiting requests into shared loops.

    - `max_batch_images`: most images decoded in one loop (a request with more images is
      split over consecutive loops).
    - `max_queue`: most jobs waiting (not yet started); `submit` raises QueueFullError past it.
    - `progress_every`: decoder steps between progress events.
    - `preview_every`: decoder steps between partial images (0 = never). Each preview runs the
      VQGAN on the unfinished images, which costs about as much as decoding them at the end.
    - `max_preview_images`: partial images per job per preview.
    - `gather_s`: how long the worker waits after the first request so that requests arriving
      together (e.g. several users clicking at once) share a loop.
    """

    def __init__(self, pipeline: DallePipeline, max_batch_images: int = 16, max_queue: int = 64,
                 progress_every: int = 16, preview_every: int = 64, max_preview_images: int = 4,
                 gather_s: float = 0.05) -> None:
        if max_batch_images < 1 or max_queue < 1 or progress_every < 1:
            raise ValueError("max_batch_images, max_queue and progress_every must be ≥ 1")
        self.pipeline = pipeline
        self.max_batch_images = max_batch_images
        self.max_queue = max_queue
        self.progress_every = progress_every
        self.preview_every = preview_every
        self.max_preview_images = max_preview_images
        self.gather_s = gather_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="dalle-scheduler", daemon=True)
        self._worker.start()

    # ---- public ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request; returns its Job at once.

        Raises ValueError for invalid settings, QueueFullError when the queue is full and
        RuntimeError after `close()`.
        """
        check_settings(request.num_images, request.temperature, request.top_k, request.top_p,
                       request.cond_scale)
        seed = request.seed if request.seed >= 0 else random_seed()
        request = dataclasses.replace(request, seed=seed)
        rows = [
            ImageSpec(request.prompt, request.negative_prompt, (seed + i) % 2**31,
                      request.temperature, request.top_k, request.top_p, request.cond_scale)
            for i in range(request.num_images)
        ]
        job = Job(request, rows, self.pipeline.image_length, self)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"The server is busy ({len(self._waiting)} requests waiting). "
                    "Please try again in a minute."
                )
            position = len(self._waiting)
            self._waiting.append(job)
            job._emit(JobEvent("queued", total=self.pipeline.image_length,
                               queue_position=position))
            self._cond.notify_all()
        return job

    @property
    def queue_size(self) -> int:
        """Jobs waiting to start."""
        with self._cond:
            return len(self._waiting)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting requests, fail the waiting ones and let the current loop finish."""
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in waiting:
            job._finish(JobEvent("error", error="The server is shutting down."))
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- worker ---------------------------------------------------------------------------

    def _forget(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass

    def _take_batch(self) -> list[_Slot] | None:
        """Wait for work, then take rows from waiting jobs in arrival order up to the limit."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
        if self.gather_s > 0:
            time.sleep(self.gather_s)
        slots: list[_Slot] = []
        room = self.max_batch_images
        with self._cond:
            while self._waiting and room > 0:
                job = self._waiting[0]
                if job.finished:
                    self._waiting.popleft()
                    continue
                take = min(room, len(job.rows) - job._next_row)
                slots.append(_Slot(job, list(range(job._next_row, job._next_row + take))))
                job._next_row += take
                room -= take
                if job._next_row == len(job.rows):
                    self._waiting.popleft()
            for position, job in enumerate(self._waiting):
                if position < 8:  # tell the first few how close they are
                    job._emit(JobEvent("queued", total=self.pipeline.image_length,
                                       queue_position=position))
        return slots

    def _run(self) -> None:
        while True:
            slots = self._take_batch()
            if slots is None:
                return
            try:
                self._decode_slots(slots)
            except BaseException as e:  # the worker never dies: report to the affected jobs
                log.exception("generation failed")
                message = _describe(e)
                for slot in slots:
                    slot.job._finish(JobEvent("error", error=message))

    def _decode_slots(self, slots: list[_Slot]) -> None:
        """Run one shared loop; on out-of-memory retry the jobs in smaller groups."""
        rows: list[ImageSpec] = []
        for slot in slots:
            slot.batch_rows = list(range(len(rows), len(rows) + len(slot.rows)))
            rows.extend(slot.job.rows[r] for r in slot.rows)
        try:
            codes, timings = self.pipeline.generate_codes(
                rows, progress=lambda step, total, partial: self._on_progress(slots, step, partial),
                progress_every=self._progress_interval(),
            )
        except GenerationStopped:
            return  # every job in the loop was cancelled
        except Exception as e:
            if is_out_of_memory(e) and len(rows) > 1:
                log.warning("out of memory with %d images; retrying in smaller loops", len(rows))
                for part in _halves(slots):
                    self._decode_slots(part)
                return
            raise
        for slot in slots:
            job = slot.job
            if job.finished:
                continue
            for r, b in zip(slot.rows, slot.batch_rows):
                job._codes[r] = codes[b]
            if len(job._codes) == len(job.rows):
                self._complete(job, timings)

    def _progress_interval(self) -> int:
        if self.preview_every > 0:
            return int(np.gcd(self.progress_every, self.preview_every))
        return self.progress_every

    def _on_progress(self, slots: list[_Slot], step: int, partial: np.ndarray) -> bool:
        """Dispatch one loop's progress to its jobs; returning False stops a fully cancelled loop."""
        alive = [s for s in slots if not s.job.finished]
        if not alive:
            return False
        total = self.pipeline.image_length
        preview = (self.preview_every > 0 and step % self.preview_every == 0 and 0 < step < total)
        if step % self.progress_every != 0 and not preview and step != total:
            return True
        for slot in alive:
            job = slot.job
            for r in slot.rows:
                job._row_steps[r] = step
            images = None
            if preview and self.max_preview_images > 0:
                chosen = slot.batch_rows[: self.max_preview_images]
                images = self.pipeline.preview_images(partial[chosen])
            job._emit(JobEvent("progress", step=job._progress_step(), total=total,
                               partial_images=images))
        return True

    def _complete(self, job: Job, timings: dict[str, float]) -> None:
        codes = np.stack([job._codes[r] for r in range(len(job.rows))])
        try:
            output = self.pipeline.finish([job.request.prompt], [job.rows], codes, timings,
                                          started=job.submitted_at)
        except Exception as e:
            log.exception("decoding the images failed")
            job._finish(JobEvent("error", error=_describe(e)))
            return
        job._finish(JobEvent("done", step=job._total, total=job._total, result=output))


def _halves(slots: list[_Slot]) -> list[list[_Slot]]:
    """Split a loop's jobs in two groups (or one job's rows in two) for an out-of-memory retry."""
    if len(slots) > 1:
        mid = len(slots) // 2
        return [slots[:mid], slots[mid:]]
    slot = slots[0]
    mid = len(slot.rows) // 2
    return [[_Slot(slot.job, slot.rows[:mid])], [_Slot(slot.job, slot.rows[mid:])]]


def _describe(error: BaseException) -> str:
    if is_out_of_memory(error):
        return ("Out of memory while generating: try fewer images, or try again when the "
                "server is less busy.")
    return f"Generation failed: {type(error).__name__}: {error}"


__all__ = [
    "GenerationRequest", "Job", "JobCancelled", "JobEvent", "JobFailed", "QueueFullError",
    "Scheduler",
]
