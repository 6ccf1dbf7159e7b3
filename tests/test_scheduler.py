"""The request scheduler: shared loops, per-job events, queue limit, cancel, errors.

Most tests drive it with a fake pipeline (instant, scriptable); one runs the real tiny
pipeline to check that batched jobs get exactly the images they would get alone.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from dalle_app.pipeline import GenerationStopped, ImageSpec, PipelineOutput, check_request
from dalle_app.request import GenerationRequest, SamplingSettings
from dalle_app.scheduler import JobCancelled, JobFailed, QueueFullError, Scheduler

LENGTH = 8


class FakePipeline:
    """Codes = the seed repeated; records every loop; can block or fail on demand."""

    image_length = LENGTH
    check = staticmethod(check_request)  # the settings; no model grid to check completions against

    def __init__(self) -> None:
        self.loops: list[list[ImageSpec]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail: Callable[[list[ImageSpec]], Exception | None] = lambda rows: None
        self.stopped = 0

    def loop_images(self) -> int:
        return 16

    def generate_codes(self, rows, progress=None, progress_every=None, steps=None):
        self.loops.append(list(rows))
        self.started.set()
        assert self.gate.wait(10)
        error = self.fail(list(rows))
        if error is not None:
            raise error
        codes = np.array([[r.seed % 1000] * LENGTH for r in rows], np.int32)
        for step in range(progress_every, LENGTH + 1, progress_every):
            if progress is not None and progress(step, LENGTH, codes[:, :step]) is False:
                self.stopped += 1
                raise GenerationStopped("stopped")
        return codes, {"encode_s": 0.0, "generate_s": 0.0}

    def preview_images(self, partial):
        return [Image.new("RGB", (4, 4)) for _ in partial]

    def finish(self, prompts, groups, codes, timings, started=None):
        from dalle_app.pipeline import GeneratedImage

        images = [[GeneratedImage(Image.new("RGB", (4, 4)), 0.0, r.seed, c) for r, c in zip(groups[0], codes)]]
        return PipelineOutput(images, prompts, {**timings, "decode_s": 0.0, "clip_s": 0.0, "total_s": 0.0})


def _scheduler(pipe: Any, **kwargs: Any) -> Scheduler:
    kwargs = {"progress_every": 2, "preview_every": 4, "gather_s": 0.05, **kwargs}
    return Scheduler(pipe, **kwargs)


def test_requests_arriving_together_share_one_loop() -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    with _scheduler(pipe, max_batch_images=16) as scheduler:
        first = scheduler.submit(GenerationRequest("warm", num_images=1, seed=1))
        assert pipe.started.wait(5)
        jobs = [scheduler.submit(GenerationRequest(f"p{i}", num_images=3, seed=100 * i)) for i in range(4)]
        pipe.gate.set()
        results = [job.result(10) for job in [first] + jobs]
    assert len(pipe.loops) == 2 and len(pipe.loops[1]) == 12  # the four waiting jobs: one loop
    for i, result in enumerate(results[1:]):
        assert [g.seed for g in result.images[0]] == [100 * i, 100 * i + 1, 100 * i + 2]
        assert result.prompts == [f"p{i}"]


def test_each_job_gets_its_own_events() -> None:
    pipe = FakePipeline()
    with _scheduler(pipe) as scheduler:
        a = scheduler.submit(GenerationRequest("a", num_images=2, seed=5))
        b = scheduler.submit(GenerationRequest("b", num_images=1, seed=7))
        events_a, events_b = list(a.events(timeout=10)), list(b.events(timeout=10))
    for events, n in ((events_a, 2), (events_b, 1)):
        kinds = [e.kind for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "done" and "progress" in kinds
        steps = [e.step for e in events if e.kind == "progress"]
        assert steps == sorted(steps) and steps[-1] == LENGTH and all(e.total == LENGTH for e in events[1:])
        previews = [e.partial_images for e in events if e.kind == "progress" and e.partial_images]
        assert previews and all(len(p) == n for p in previews)
    assert [g.seed for g in events_a[-1].result.images[0]] == [5, 6]


def test_big_request_is_split_over_loops() -> None:
    pipe = FakePipeline()
    with _scheduler(pipe, max_batch_images=4) as scheduler:
        result = scheduler.submit(GenerationRequest("big", num_images=10, seed=0)).result(10)
    assert [len(loop) for loop in pipe.loops] == [4, 4, 2]
    assert sorted(g.seed for g in result.images[0]) == list(range(10))


def test_queue_full_and_random_seed() -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    with _scheduler(pipe, max_queued_images=2) as scheduler:
        running = scheduler.submit(GenerationRequest("run", num_images=1))  # seed drawn by the record
        assert pipe.started.wait(5)
        waiting = [scheduler.submit(GenerationRequest("w", num_images=1)) for _ in range(2)]
        with pytest.raises(QueueFullError, match="busy"):
            scheduler.submit(GenerationRequest("one too many"))
        pipe.gate.set()
        for job in [running] + waiting:
            job.result(10)
        assert 0 <= running.request.seed < 2**31
        assert running.result(10).images[0][0].seed == running.request.seed
        with pytest.raises(ValueError, match="top_p"):
            scheduler.submit(GenerationRequest("bad", sampling=SamplingSettings(top_p=2.0)))
        with pytest.raises(ValueError, match="seed"):
            scheduler.submit(GenerationRequest("bad", seed=-1))


def test_cancel_waiting_and_running_jobs() -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    with _scheduler(pipe, gather_s=0.2) as scheduler:
        running = scheduler.submit(GenerationRequest("run", num_images=2, seed=1))
        other = scheduler.submit(GenerationRequest("other", num_images=2, seed=3))
        assert pipe.started.wait(5)
        waiting = scheduler.submit(GenerationRequest("wait", num_images=2, seed=9))
        waiting.cancel()
        running.cancel()
        pipe.gate.set()
        assert other.result(10).images[0][0].seed in (3, 4)  # its loop-mate was cancelled: unaffected
        with pytest.raises(JobCancelled):
            running.result(10)
        with pytest.raises(JobCancelled):
            waiting.result(10)
        events = list(running.events(timeout=10))
        assert events[-1].kind == "cancelled" and all(e.kind != "done" for e in events)
        # a job submitted after the cancelled one is decoded: the queue has moved past it
        after = scheduler.submit(GenerationRequest("after", num_images=1, seed=5))
        assert after.result(10).images[0][0].seed == 5
    assert any(r.request.prompt == "after" for loop in pipe.loops for r in loop)
    assert all(r.request.prompt != "wait" for loop in pipe.loops for r in loop)  # the cancelled job: never decoded


def test_fully_cancelled_loop_stops_early() -> None:
    pipe = FakePipeline()
    pipe.gate.clear()
    with _scheduler(pipe) as scheduler:
        job = scheduler.submit(GenerationRequest("x", num_images=1))
        assert pipe.started.wait(5)
        job.cancel()
        pipe.gate.set()
        with pytest.raises(JobCancelled):
            job.result(10)
        after = scheduler.submit(GenerationRequest("y", num_images=1, seed=4))
        assert after.result(10).images[0][0].seed == 4
    assert pipe.stopped == 1


def test_errors_reach_only_the_affected_jobs_and_the_worker_survives() -> None:
    pipe = FakePipeline()
    pipe.fail = lambda rows: RuntimeError("boom") if any(r.request.prompt == "bad" for r in rows) else None
    with _scheduler(pipe, gather_s=0.0) as scheduler:
        bad = scheduler.submit(GenerationRequest("bad", num_images=1))
        with pytest.raises(JobFailed, match="boom"):
            bad.result(10)
        assert list(bad.events(timeout=10))[-1].kind == "error"
        good = scheduler.submit(GenerationRequest("good", num_images=1, seed=2))
        assert good.result(10).images[0][0].seed == 2


def test_out_of_memory_retries_with_smaller_loops() -> None:
    pipe = FakePipeline()
    pipe.fail = lambda rows: RuntimeError("RESOURCE_EXHAUSTED: out of memory") if len(rows) > 2 else None
    pipe.gate.clear()
    with _scheduler(pipe) as scheduler:
        first = scheduler.submit(GenerationRequest("warm", num_images=1))
        assert pipe.started.wait(5)
        jobs = [scheduler.submit(GenerationRequest(f"p{i}", num_images=2, seed=10 * i)) for i in range(3)]
        pipe.gate.set()
        first.result(10)
        outputs = [job.result(10) for job in jobs]
    assert [sorted(g.seed for g in o.images[0]) for o in outputs] == [[0, 1], [10, 11], [20, 21]]
    assert [len(loop) for loop in pipe.loops] == [1, 6, 2, 4, 2, 2]


def test_scheduler_with_the_real_pipeline(tmp_path) -> None:
    """Jobs batched into one loop get exactly the codes the pipeline gives each alone."""
    import shutil

    from dalle_app.pipeline import DallePipeline
    from tests.test_pipeline import REFERENCE, _clip, _vqgan

    dalle = tmp_path / "dalle"
    shutil.copytree(REFERENCE / "dallebart_tiny_a", dalle, ignore=shutil.ignore_patterns("expected*"))
    pipe = DallePipeline.from_pretrained(dalle, _vqgan(tmp_path / "vqgan", 16, 64), _clip(tmp_path / "clip"),
                                         batch_buckets=(4,), warmup=())
    requests = [GenerationRequest("a red bus", num_images=2, seed=3),
                GenerationRequest("two cats", "blurry", num_images=2, seed=8, sampling=SamplingSettings(top_k=5))]
    with Scheduler(pipe, progress_every=4, preview_every=8, gather_s=0.3) as scheduler:
        jobs = [scheduler.submit(r) for r in requests]
        events = list(jobs[0].events(timeout=300))
        outputs = [job.result(300) for job in jobs]
    previews = [e.partial_images for e in events if e.kind == "progress" and e.partial_images]
    assert [e.step for e in events if e.kind == "progress"] == [4, 8, 12, 16]
    assert len(previews) == 1 and len(previews[0]) == 2 and previews[0][0].size == (16, 16)
    for request, output in zip(requests, outputs):
        alone = pipe(request.prompt, num_images=2, seed=request.seed, top_k=request.sampling.top_k,
                     negative_prompt=request.negative_prompt)
        got = {g.seed: g.codes for g in output.images[0]}
        want = {g.seed: g.codes for g in alone.images[0]}
        assert got.keys() == want.keys()
        for seed in got:
            np.testing.assert_array_equal(got[seed], want[seed])


def test_close_if_idle_keeps_a_scheduler_with_waiting_requests_and_lets_a_running_loop_finish() -> None:
    from dalle_app.scheduler import SchedulerClosed

    pipe = FakePipeline()
    pipe.gate.clear()
    scheduler = _scheduler(pipe)
    running = scheduler.submit(GenerationRequest("running", num_images=1, seed=1))
    assert pipe.started.wait(5)
    waiting = scheduler.submit(GenerationRequest("waiting", num_images=1, seed=2))
    assert not scheduler.close_if_idle()  # a request waits: the model is in use
    pipe.gate.set()
    assert waiting.result(10).images[0][0].seed == 2 and running.result(10).images[0][0].seed == 1
    assert scheduler.close_if_idle()
    with pytest.raises(SchedulerClosed):
        scheduler.submit(GenerationRequest("late", num_images=1, seed=3))
