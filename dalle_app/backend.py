"""Where a validated request is generated: the seam between the UI and the models.

The Gradio handlers (dalle_app.ui) talk to a `Backend`: `submit` a checked request, then read
the `Generation`'s scheduler events, or cancel it; `start_completion` turns a checked upload
into a completion request with the model's own VQGAN, where the model is loaded. `LocalBackend`
is this process's model pool, used by `python app.py` and by each Ray Serve replica;
`dalle_app.serve_backend.RayBackend` is the same interface over the replicas of a Ray Serve
deployment. Both raise the same errors from `submit` (ModelLoadError, QueueFullError,
ValueError) and yield the same `JobEvent`s.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Protocol

from dalle_app.catalog import ModelPool
from dalle_app.request import GenerationRequest
from dalle_app.scheduler import Job, JobEvent, QueueFullError, SchedulerClosed
from dalle_app.uploads import Upload, start_completion


class BackendError(RuntimeError):
    """The model servers could not take a call (Ray Serve: none running, or lost twice); the
    message is for the user."""


LOCAL_REPLICA = "local"
"""The `replica` of requests generated in the app's own process."""


class Generation(Protocol):
    """A submitted request: its events (ending with "done", "error" or "cancelled"), and a way to stop it."""

    replica: str  # which model server generated it ("local", or a Ray Serve replica id)

    def events(self) -> AsyncIterator[JobEvent]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    async def submit(self, request: GenerationRequest) -> Generation:
        """Start generating; raises ModelLoadError, QueueFullError or ValueError (the pipeline's limits)."""
        ...

    async def start_completion(self, request: GenerationRequest, upload: Upload, keep_rows: object,
                               ) -> GenerationRequest:
        """`request` completing `upload` from its top `keep_rows` code rows (encoded by the
        model's VQGAN unless it carries the model's own codes); raises ModelLoadError,
        ValidationError, QueueFullError or BackendError."""
        ...


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


class LocalGeneration:
    """A scheduler job of this process, as a `Generation`."""

    def __init__(self, job: Job, replica: str) -> None:
        self.job = job
        self.replica = replica

    def events(self) -> AsyncIterator[JobEvent]:
        return job_events(self.job)

    def cancel(self) -> None:
        self.job.cancel()


class LocalBackend:
    """Requests go to this process's schedulers (one per loaded model, loaded on first use)."""

    def __init__(self, pool: ModelPool, replica: str = LOCAL_REPLICA) -> None:
        self.pool = pool
        self.replica = replica

    async def start_completion(self, request: GenerationRequest, upload: Upload, keep_rows: object,
                               ) -> GenerationRequest:
        # loading may take minutes: off the event loop, but a loaded model needs no thread
        scheduler = self.pool.loaded(request.model) or await asyncio.to_thread(self.pool.get, request.model)
        # encoding the picture is CPU work: off the event loop too
        return await asyncio.to_thread(start_completion, request, upload, keep_rows, scheduler.pipeline.vqgan)

    async def submit(self, request: GenerationRequest) -> LocalGeneration:
        for _ in range(2):  # a model unloaded (to make room) between get and submit is loaded again
            # loading may take minutes: off the event loop, but a loaded model needs no thread
            scheduler = self.pool.loaded(request.model) or await asyncio.to_thread(self.pool.get, request.model)
            try:
                return LocalGeneration(scheduler.submit(request), self.replica)
            except SchedulerClosed:
                continue
        raise QueueFullError("the model was unloaded again while this request was being submitted")
