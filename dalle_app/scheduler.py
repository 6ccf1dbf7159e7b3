"""Request scheduler: one worker thread owns the device and batches users' requests together.

Why: generating is memory-bound (every decoder step reads all the weights once), so decoding
the images of several requests in one loop costs little more than decoding one request's.
Requests that are waiting when a loop starts share it; each request still gets its own
progress events, partial images and result, and can be cancelled without disturbing the rest.

Fairness: a loop takes its images round-robin across clients (`GenerationRequest.client`),
one image per client in turn, oldest request first within a client, so a newcomer's request
starts within about one loop however many images another client has queued. Per-image seeds
make an image the same whichever loop decodes it. (How many images each client may queue is
the front end's `admission.Admission`.)

Usage (e.g. from a Gradio handler; requests usually come from `validation.validate_request`):

    scheduler = Scheduler(pipeline)
    job = scheduler.submit(GenerationRequest(prompt="a red bus", num_images=4, seed=7))
    for event in job.events():
        if event.kind == "progress": show(event.step, event.total, event.partial_images)
        elif event.kind == "done": show_gallery(event.result.images[0])
        elif event.kind in ("error", "cancelled"): show_message(event.error)
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image

from dalle_app.admission import positive_int_env
from dalle_app.pipeline import (
    DallePipeline,
    GenerationStopped,
    ImageSpec,
    PipelineOutput,
    image_rows,
    is_out_of_memory,
)
from dalle_app.request import GenerationRequest

log = logging.getLogger(__name__)

LOOP_IMAGES_ENV = "DALLE_APP_MAX_LOOP_IMAGES"
"""Sets the images per shared loop outright, instead of the pipeline's `loop_images()`."""
MAX_QUEUED_IMAGES = 256
"""Images waiting for a loop (sixteen loops of 16) before `submit` answers QueueFullError."""
MAX_QUEUED_IMAGES_ENV = "DALLE_APP_MAX_QUEUED_IMAGES"
PROGRESS_EVERY = 16
"""Decoder steps between progress events."""
PREVIEW_EVERY = 64
"""Decoder steps between previews (a quarter of DALL·E Mini's 256 codes)."""
MAX_PREVIEW_IMAGES = 4
"""Partial images per job per preview."""
GATHER_S = 0.05
"""Seconds the worker waits after the first request so that requests arriving together share a loop."""
QUEUE_UPDATES = 8
"""Waiting jobs (the first ones) told their new position when a loop starts."""

EventKind = Literal["queued", "progress", "done", "error", "cancelled"]


class QueueFullError(RuntimeError):
    """Raised by `Scheduler.submit` when the request's images would pass `max_queued_images`."""


class SchedulerClosed(RuntimeError):
    """Raised by `Scheduler.submit` after `close()` (the server stops, or the model was unloaded)."""


class JobCancelled(RuntimeError):
    """Raised by `Job.result` for a job that was cancelled."""


class JobFailed(RuntimeError):
    """Raised by `Job.result` for a job whose generation failed (the message says why)."""


@dataclass(frozen=True)
class JobEvent:
    """What happened to a job.

    kind:
      "queued"    — accepted; `queue_position` waiting jobs start before it (0 = next).
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
    """Handle on a submitted request. Thread-safe; meant for one consumer of `events()`.

    The scheduler drives it through `post`, `finish`, `take_rows`, `record_steps` and
    `store_codes`; consumers use `events`, `result` and `cancel`.
    """

    def __init__(self, request: GenerationRequest, total_steps: int,
                 forget: Callable[["Job"], None]) -> None:
        self.request = request
        self.rows: list[ImageSpec] = image_rows(request)
        self.total_steps = total_steps
        self._forget = forget
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._final: JobEvent | None = None
        self._next_row = 0  # rows [0, _next_row) have been handed to a decoding loop
        self._codes: dict[int, np.ndarray] = {}
        self._row_steps: dict[int, int] = {}
        self.submitted_at = time.perf_counter()  # the clock of the pipeline's timings

    # ---- public ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

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
        if self.finish(JobEvent("cancelled", error="cancelled")):
            self._forget(self)

    # ---- used by the scheduler ------------------------------------------------------------

    def post(self, event: JobEvent) -> None:
        """Post a non-terminal event (dropped once the job has ended)."""
        with self._lock:
            if self._final is None:
                self._events.put(event)

    def finish(self, event: JobEvent) -> bool:
        """Post the terminal event once; False if the job had already ended."""
        with self._lock:
            if self._final is not None:
                return False
            self._final = event
            self._events.put(event)
        self._finished.set()
        return True

    @property
    def started(self) -> bool:
        """Whether some of its rows have been handed to a decoding loop."""
        return self._next_row > 0

    @property
    def rows_left(self) -> int:
        """Rows not yet handed to a decoding loop."""
        return len(self.rows) - self._next_row

    def take_rows(self, limit: int) -> list[int]:
        """Hand up to `limit` of the next rows (their indices) to a decoding loop."""
        take = min(limit, self.rows_left)
        taken = list(range(self._next_row, self._next_row + take))
        self._next_row += take
        return taken

    def record_steps(self, rows: list[int], step: int) -> int:
        """Note that `rows` reached decoder `step`; returns the job's progress: steps done,
        averaged over its images (so it ends at one loop's length)."""
        for r in rows:
            self._row_steps[r] = step
        return min(self.total_steps, sum(self._row_steps.values()) // len(self.rows))

    def store_codes(self, rows: list[int], codes: np.ndarray) -> np.ndarray | None:
        """Keep the finished codes of `rows`; once every row has its codes, return them all
        (len(rows), image_length) in row order, else None."""
        for r, c in zip(rows, codes):
            self._codes[r] = c
        if len(self._codes) < len(self.rows):
            return None
        return np.stack([self._codes[r] for r in range(len(self.rows))])


@dataclass
class _Slot:
    """Rows of one job inside the current decoding loop."""

    job: Job
    rows: list[int]            # the job's row indices
    batch_rows: list[int] = field(default_factory=list)  # their positions in the loop's batch


class Scheduler:
    """Owns the pipeline through one worker thread; batches waiting requests into shared loops.

    - `max_batch_images`: most images decoded in one loop (a request with more images is
      split over consecutive loops). None: $DALLE_APP_MAX_LOOP_IMAGES, else what the pipeline
      chose for this device (`DallePipeline.loop_images`: 16, or up to 64 where that pays).
    - `max_queued_images`: most images waiting for a loop; `submit` raises QueueFullError for
      a request that would pass it. None: $DALLE_APP_MAX_QUEUED_IMAGES, else MAX_QUEUED_IMAGES.
    - `progress_every`: decoder steps between progress events.
    - `preview_every`: decoder steps between partial images (0 = never). Each preview runs the
      VQGAN on the unfinished images, which costs about as much as decoding them at the end.
    - `max_preview_images`: partial images per job per preview.
    - `gather_s`: how long the worker waits after the first request so that requests arriving
      together (e.g. several users clicking at once) share a loop.
    """

    def __init__(self, pipeline: DallePipeline, max_batch_images: int | None = None,
                 max_queued_images: int | None = None, progress_every: int = PROGRESS_EVERY,
                 preview_every: int = PREVIEW_EVERY, max_preview_images: int = MAX_PREVIEW_IMAGES,
                 gather_s: float = GATHER_S) -> None:
        if max_queued_images is None:
            max_queued_images = positive_int_env(os.environ, MAX_QUEUED_IMAGES_ENV, MAX_QUEUED_IMAGES)
        if max_batch_images is None:
            max_batch_images = positive_int_env(os.environ, LOOP_IMAGES_ENV, pipeline.loop_images())
        if max_batch_images < 1 or max_queued_images < 1 or progress_every < 1:
            raise ValueError("max_batch_images, max_queued_images and progress_every must be ≥ 1")
        self.pipeline = pipeline
        self.max_batch_images = max_batch_images
        self.max_queued_images = max_queued_images
        self.progress_every = progress_every
        self.preview_every = preview_every
        self.max_preview_images = max_preview_images
        self.gather_s = gather_s
        # waiting jobs by client, oldest first; the clients in round-robin order (next served first)
        self._clients: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="dalle-scheduler", daemon=True)
        self._worker.start()

    # ---- public ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request (as it is: its seed is already resolved); returns its Job at once.

        Raises ValueError for invalid settings, QueueFullError when the queue is full and
        SchedulerClosed after `close()`.
        """
        self.pipeline.check(request)
        job = Job(request, self.pipeline.image_length, self._forget)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            waiting = self._waiting_images()
            if waiting + request.num_images > self.max_queued_images:
                raise QueueFullError(
                    f"The server is busy ({waiting} images waiting). Please try again in a minute."
                )
            self._clients.setdefault(request.client, collections.deque()).append(job)
            position = self._start_order().index(job)
            job.post(JobEvent("queued", total=self.pipeline.image_length, queue_position=position))
            self._cond.notify_all()
        return job

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting requests, fail the waiting ones and let the current loop finish."""
        with self._cond:
            self._closed = True
            waiting = [job for jobs in self._clients.values() for job in jobs]
            self._clients.clear()
            self._cond.notify_all()
        for job in waiting:
            job.finish(JobEvent("error", error="The server is shutting down."))
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def close_if_idle(self) -> bool:
        """Close if no request is waiting (a loop already running still finishes its requests);
        returns whether it closed. Checked and closed at once, so no request is turned away."""
        with self._cond:
            if self._clients:
                return False
            self._closed = True
            self._cond.notify_all()
        return True

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- worker (the methods below run with self._cond held unless they say otherwise) ------

    def _waiting_images(self) -> int:
        return sum(job.rows_left for jobs in self._clients.values() for job in jobs)

    def _start_order(self) -> list[Job]:
        """The waiting jobs not yet started, in the order the round-robin will start them.

        A client's turn comes once per round, in rotation order, while it has rows left; so a
        job starts in the round numbered by the rows queued ahead of it by the same client.
        """
        keyed = []
        for turn, jobs in enumerate(self._clients.values()):
            ahead = 0
            for job in jobs:
                if not job.started:
                    keyed.append((ahead, turn, job))
                ahead += job.rows_left
        keyed.sort(key=lambda k: k[:2])
        return [job for _, _, job in keyed]

    def _forget(self, job: Job) -> None:
        with self._cond:
            jobs = self._clients.get(job.request.client)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                if not jobs:
                    del self._clients[job.request.client]

    def _take_image(self) -> tuple[Job, int] | None:
        """The next image round-robin: one row of the next client's oldest job; that client then
        goes to the back of the rotation (or leaves it, with nothing left)."""
        while self._clients:
            client, jobs = next(iter(self._clients.items()))
            job = jobs[0]
            if job.finished:  # failed in an earlier loop with rows still waiting
                jobs.popleft()
                if not jobs:
                    del self._clients[client]
                continue
            row = job.take_rows(1)[0]
            if job.rows_left == 0:
                jobs.popleft()
            if jobs:
                self._clients.move_to_end(client)
            else:
                del self._clients[client]
            return job, row
        return None

    def _take_batch(self) -> list[_Slot] | None:
        """Wait for work, then fill a loop with images taken round-robin across clients.
        (Takes the lock itself.)"""
        with self._cond:
            while not self._clients and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
        if self.gather_s > 0:
            time.sleep(self.gather_s)
        taken: dict[Job, list[int]] = {}
        with self._cond:
            for _ in range(self.max_batch_images):
                image = self._take_image()
                if image is None:
                    break
                taken.setdefault(image[0], []).append(image[1])
            for position, job in enumerate(self._start_order()[:QUEUE_UPDATES]):
                job.post(JobEvent("queued", total=self.pipeline.image_length, queue_position=position))
        return [_Slot(job, rows) for job, rows in taken.items()]

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
                    slot.job.finish(JobEvent("error", error=message))

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
            if slot.job.finished:
                continue
            done = slot.job.store_codes(slot.rows, codes[slot.batch_rows])
            if done is not None:
                self._complete(slot.job, done, timings)

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
            images = None
            if preview and self.max_preview_images > 0:
                chosen = slot.batch_rows[: self.max_preview_images]
                images = self.pipeline.preview_images(partial[chosen])
            slot.job.post(JobEvent("progress", step=slot.job.record_steps(slot.rows, step), total=total,
                                   partial_images=images))
        return True

    def _complete(self, job: Job, codes: np.ndarray, timings: dict[str, float]) -> None:
        try:
            output = self.pipeline.finish([job.request.prompt], [job.rows], codes, timings,
                                          started=job.submitted_at)
        except Exception as e:
            log.exception("decoding the images failed")
            job.finish(JobEvent("error", error=_describe(e)))
            return
        job.finish(JobEvent("done", step=job.total_steps, total=job.total_steps, result=output))


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
    "Scheduler", "SchedulerClosed",
]
