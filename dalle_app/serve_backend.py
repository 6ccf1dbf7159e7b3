"""The generation pipeline as a Ray Serve deployment, and the app's backend over its replicas.

Each replica (`GenerationReplica`) is one model server: it loads the default model once and owns
the project's own scheduler, so the requests Serve routes to it share its decoding loops exactly
as in `python app.py` (a replica is a `LocalBackend` reached through Ray). The Gradio front end
keeps validation and the UI; `RayBackend` sends each checked request to the deployment through
a streaming `DeploymentHandle` and reads back the scheduler's own `JobEvent`s.

Faults: a replica that dies mid-request (killed, out of memory, its node lost) makes Ray fail
the request's stream; `RayBackend` then resubmits it once (the request record holds its seed,
so the images are the same) and, if that fails too, ends it with a clear error. Queue bounds
(set by dalle_app.serve): a replica accepts a bounded number of requests, the front end holds a
bounded number waiting for a replica with room, and past that the user gets the same "busy"
answer as from a single process.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

from ray import serve
from ray.exceptions import NodeDiedError, OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from dalle_app.backend import BackendError, LocalBackend
from dalle_app.catalog import Catalog, ModelLoadError, ModelPool, load_scheduler
from dalle_app.hardware import memory_budget_gb
from dalle_app.request import GenerationRequest
from dalle_app.scheduler import JobEvent, QueueFullError
from dalle_app.uploads import Upload

log = logging.getLogger(__name__)

APP_NAME = "dalle_app"
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ReplicaUnavailableError)
"""What Ray raises on a request whose replica process or node went away."""
LOST_MESSAGE = ("The model server handling this request stopped (it was restarted or ran out of memory), "
                "twice in a row. Please try again.")
UNAVAILABLE_MESSAGE = "The model servers are not running (they failed to start): see the server log."
_TERMINAL = ("done", "error", "cancelled")


@dataclass(frozen=True)
class Accepted:
    """A replica's first answer to a request: it is queued there."""

    replica: str


class GenerationReplica:
    """One model server of the deployment: the default model loaded once, behind its scheduler."""

    def __init__(self, warmup: Sequence[int] = ()) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        catalog = Catalog.from_env()
        pool = ModelPool(catalog, load_scheduler, budget_gb=memory_budget_gb())
        try:  # like `python app.py`: serve anyway, other models may work
            scheduler = pool.get(catalog.default)
            if warmup:
                scheduler.pipeline.warmup(tuple(warmup))
        except ModelLoadError as e:
            log.error("replica %s could not load the default model: %s", self.replica, e)
        self.backend = LocalBackend(pool, replica=self.replica)
        self.outcomes: collections.Counter[str] = collections.Counter()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Accepted | JobEvent]:
        """Stream `Accepted`, then the request's events; a caller that cancels cancels the job."""
        generation = await self.backend.submit(request)
        outcome = "cancelled"  # unless the job reaches its own end
        try:
            yield Accepted(self.replica)
            async for event in generation.events():
                if event.kind in _TERMINAL:
                    outcome = event.kind
                yield event
        finally:
            generation.cancel()  # a no-op once the job has ended
            self.outcomes[outcome] += 1

    async def start_completion(self, request: GenerationRequest, upload: Upload, keep_rows: object,
                               ) -> GenerationRequest:
        """The completion request for a picture the front end has checked, encoded by this
        replica's VQGAN."""
        return await self.backend.start_completion(request, upload, keep_rows)

    def stats(self) -> dict[str, Any]:
        """This replica's id and how its requests ended (done / error / cancelled)."""
        return {"replica": self.replica, **self.outcomes}


class RemoteGeneration:
    """A request running on a replica, read through a streaming `DeploymentHandle` call."""

    def __init__(self, handle: Any, request: GenerationRequest, retries: int) -> None:
        self._handle = handle
        self._request = request
        self._retries = retries
        self._response: Any = None
        self._cancelled = False
        self.failure: str | None = None
        self.replica = ""

    async def start(self) -> None:
        """Route the request to a replica and wait until that replica has queued it."""
        while True:
            self._response = self._handle.generate.remote(self._request)
            try:
                accepted = await self._response.__anext__()
            except BackPressureError:
                raise QueueFullError("every replica is full and the front end's queue too") from None
            except DeploymentUnavailableError:
                self.failure = UNAVAILABLE_MESSAGE
                return
            except RayTaskError as e:  # the replica refused it: busy, model not loadable, bad settings
                raise _original(e) from None
            except REPLICA_LOST as e:
                if self._retry(e):
                    continue
                return
            self.replica = accepted.replica
            return

    def _retry(self, error: BaseException) -> bool:
        """Use up one retry after a lost replica; False (with the failure set) when none is left."""
        if self._retries > 0 and not self._cancelled:
            self._retries -= 1
            log.warning("replica %s was lost (%s); resubmitting the request",
                        self.replica or "?", type(error).__name__)
            return True
        self.failure = LOST_MESSAGE
        return False

    async def events(self) -> AsyncIterator[JobEvent]:
        while self.failure is None:
            try:
                async for event in self._response:
                    yield event
                    if event.kind in _TERMINAL:
                        return
                self.failure = LOST_MESSAGE  # a stream that ends without a verdict: treat as lost
            except RayTaskError as e:
                self.failure = f"Generation failed: {_original(e)}"
            except REPLICA_LOST as e:
                if self._retry(e):
                    await self._restart()
        yield JobEvent("error", error=self.failure)

    async def _restart(self) -> None:
        try:
            await self.start()
        except QueueFullError:
            self.failure = ("The model server handling this request stopped and the others are busy. "
                            "Please try again in a minute.")
        except Exception as e:  # the new replica refused it (e.g. the model fails to load there)
            self.failure = f"Generation failed: {e}"

    def cancel(self) -> None:
        """Stop the request on its replica. Serve's cancel may wait for the request to be routed,
        so it runs on a worker thread, never on the caller's event loop."""
        self._cancelled = True
        if self._response is None:
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, self._cancel_response, self._response)
        except RuntimeError:  # no event loop here: cancel in place
            self._cancel_response(self._response)

    @staticmethod
    def _cancel_response(response: Any) -> None:
        try:
            response.cancel()
        except concurrent.futures.CancelledError:
            pass  # cancelled before it reached a replica


class RayBackend:
    """Requests go to the replicas of a `GenerationReplica` deployment (Serve spreads them)."""

    def __init__(self, handle: Any, retries: int = 1) -> None:
        self._calls = handle
        self._handle = handle.options(stream=True)
        self.retries = retries

    async def start_completion(self, request: GenerationRequest, upload: Upload, keep_rows: object,
                               ) -> GenerationRequest:
        """Any replica encodes the picture (all load the same model); its errors come back as
        they were raised there, and every replica full is QueueFullError, as for `submit`."""
        tries = self.retries + 1
        while True:
            try:
                return await self._calls.start_completion.remote(request, upload, keep_rows)
            except BackPressureError:
                raise QueueFullError("every replica is full and the front end's queue too") from None
            except DeploymentUnavailableError:
                raise BackendError(UNAVAILABLE_MESSAGE) from None
            except RayTaskError as e:
                raise _original(e) from None
            except REPLICA_LOST:
                tries -= 1
                if not tries:
                    raise BackendError(LOST_MESSAGE) from None

    async def submit(self, request: GenerationRequest) -> RemoteGeneration:
        generation = RemoteGeneration(self._handle, request, self.retries)
        await generation.start()
        return generation


def _original(error: RayTaskError) -> BaseException:
    """The exception the replica raised, without Ray's remote traceback in its message."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else RuntimeError(str(error).splitlines()[0])


def deploy(options: Mapping[str, Any], warmup: Sequence[int] = ()) -> Any:
    """Start (or update) the deployment with these `serve.deployment` options on the connected
    cluster; returns its handle once every replica has loaded its model. Serve's HTTP proxy stays
    off: the Gradio app is the front door."""
    serve.start(proxy_location="Disabled")
    app = serve.deployment(GenerationReplica).options(**options).bind(tuple(warmup))
    return serve.run(app, name=APP_NAME, route_prefix=None)


def shut_down(owns_cluster: bool) -> None:
    """Remove the deployment; stop Serve too when the cluster is our own."""
    import ray

    if not ray.is_initialized():
        return
    try:
        if owns_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
