"""Load test of the app over its real API, on loopback only, bounded in requests and time.

Starts `python app.py` on a free 127.0.0.1 port (or uses --url, which must be loopback), then
1. burst: `--concurrent` users (one gradio_client each) submit at once; every request must
   complete or get the clear "busy" answer, and each completed one must come back with its
   own prompt and seed (nothing lost, nothing mixed up between users);
2. soak: `--total` requests, `--concurrent` at a time, with the server's RSS sampled before
   and after, to show memory stays flat.
Prints completed, rejected, failed, lost, p50/p95 latency and RSS before/after; exits 1 when a
request is lost, failed or mixed up.

    python benchmarks/load.py                          # embedded model, 64 users, 500 requests
    python benchmarks/load.py --model "dalle+vqgan+clip folders" --total 200
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil
from gradio_client import Client
from gradio_client.exceptions import AppError

ROOT = Path(__file__).resolve().parents[1]
SOAK_CHUNK = 100
REQUEST_HTTP_TIMEOUT_S = 120  # a saturated CPU server may take longer than httpx's 5 s to accept a job
BUSY_MARKERS = ("server is busy", "queue is full")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("square", "circle", "triangle", "diamond", "star", "cross")


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    model_s: list[float] = field(default_factory=list)  # the server's own total_s per request
    completed: int = 0
    rejected: int = 0
    busy_answers: collections.Counter = field(default_factory=collections.Counter)  # message → count
    failed: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    lost: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def merge(self, other: "Tally") -> None:
        self.latencies += other.latencies
        self.model_s += other.model_s
        self.completed += other.completed
        self.rejected += other.rejected
        self.busy_answers.update(other.busy_answers)
        self.failed += other.failed
        self.mixed += other.mixed
        self.lost += other.lost

    def line(self, name: str) -> str:
        p50, p95 = percentiles(self.latencies)
        m50, _ = percentiles(self.model_s)
        return (f"{name}: completed {self.completed}, rejected (busy) {self.rejected}, failed {len(self.failed)}, "
                f"mixed up {len(self.mixed)}, lost {self.lost}; latency p50 {p50:.2f} s, p95 {p95:.2f} s "
                f"(server-side total_s p50 {m50:.2f} s)")


def cpu_model() -> str:
    """The CPU's model name, written beside every figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p95 (nearest rank); nan for no values."""
    v = sorted(values)
    if not v:
        return float("nan"), float("nan")
    return statistics.median(v), v[min(len(v) - 1, int(0.95 * len(v)))]


def prompt_for(i: int) -> str:
    a, b = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
    return f"a {a} {b} above a {COLORS[(i + 3) % len(COLORS)]} {SHAPES[(i + 1) % len(SHAPES)]} #{i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, warmup: str, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free loopback port; returns the process and its URL once it listens."""
    port = free_port()
    env = os.environ | {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                        "DALLE_APP_WARMUP": warmup, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"}
    if model:
        env |= {"DALLE_APP_MODELS": model, "DALLE_APP_DEFAULT_MODEL": model}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "dalle_app is listening on" in line:
            url = line.rsplit(" ", 1)[-1].strip()
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, url
    proc.kill()
    raise SystemExit("the server did not start:\n" + "".join(lines[-40:]))


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Users:
    """Simulated users, one gradio_client each, opened before they are timed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.all: list[Client] = []
        self.idle: queue.Queue[Client] = queue.Queue()

    def ensure(self, n: int) -> None:
        """Open clients until there are `n` users (a few at a time, not to time out the server)."""
        missing = n - len(self.all)
        if missing <= 0:
            return
        with ThreadPoolExecutor(max_workers=8) as pool:
            opened = list(pool.map(lambda _: Client(self.url, verbose=False, download_files=False,
                                                    httpx_kwargs={"timeout": REQUEST_HTTP_TIMEOUT_S}),
                                   range(missing)))
        self.all.extend(opened)
        for c in opened:
            self.idle.put(c)

    def close(self) -> None:
        for c in self.all:
            c.close()


def one_request(users: Users, i: int, num_images: int, model: str | None, tally: Tally, timeout_s: float) -> None:
    client = users.idle.get()
    try:
        request(client, i, num_images, model, tally, timeout_s)
    finally:
        users.idle.put(client)


def request(client: Client, i: int, num_images: int, model: str | None, tally: Tally, timeout_s: float) -> None:
    """One user's request, checked: it must come back with its own prompt and seeds."""
    prompt, seed = prompt_for(i), 1000 + i
    kwargs = dict(prompt=prompt, num_images=num_images, seed=seed, api_name="/generate")
    if model:
        kwargs["model"] = model
    start = time.monotonic()
    try:
        job = client.submit(**kwargs)
        gallery, summary = job.result(timeout=timeout_s)
    except AppError as e:
        busy = any(m in str(e).lower() for m in BUSY_MARKERS)
        with tally.lock:
            if busy:
                tally.rejected += 1
                tally.busy_answers[str(e)] += 1
            else:
                tally.failed.append(f"#{i}: {e}")
        return
    except TimeoutError:
        with tally.lock:
            tally.lost += 1
        return
    except Exception as e:  # QueueError ("Queue is full") and transport errors
        busy = any(m in str(e).lower() for m in BUSY_MARKERS)
        with tally.lock:
            if busy:
                tally.rejected += 1
                tally.busy_answers[f"{type(e).__name__}: {e}"] += 1
            else:
                tally.failed.append(f"#{i}: {type(e).__name__}: {e}")
        return
    elapsed = time.monotonic() - start
    expected_seeds = sorted((seed + k) % 2**31 for k in range(num_images))
    ok = (summary.get("prompt") == prompt and sorted(summary.get("seeds", [])) == expected_seeds
          and len(gallery) == num_images)
    with tally.lock:
        if ok:
            tally.completed += 1
            tally.latencies.append(elapsed)
            tally.model_s.append(float(summary.get("timings", {}).get("total_s", float("nan"))))
        else:
            got = f"{summary.get('prompt')!r} {summary.get('seeds')}"
            tally.mixed.append(f"#{i}: sent {prompt!r} seed {seed}, got {got}")


def run_phase(users: Users, start: int, count: int, concurrent: int, num_images: int, model: str | None,
              timeout_s: float) -> Tally:
    tally = Tally()
    users.ensure(concurrent)
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        for i in range(start, start + count):
            pool.submit(one_request, users, i, num_images, model, tally, timeout_s)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running app (loopback only); default: start python app.py")
    parser.add_argument("--model", help="model name or dalle+vqgan+clip spec (default: the server's default)")
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--total", type=int, default=500, help="requests in the soak phase (at most 2000)")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--overload", type=int, default=0,
                        help="then this many users at once, beyond the queue (e.g. 160): shows the busy answer")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--warmup", default="1,2,4,9,16", help="batch sizes the server compiles first")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.total > 2000 or args.concurrent > 256:
        parser.error("bounded: --total ≤ 2000, --concurrent ≤ 256")

    proc = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must be a loopback address")
        url, pid = args.url, None
    else:
        started = time.monotonic()
        proc, url = start_server(args.model, args.warmup, timeout_s=900)
        pid = proc.pid
        print(f"server {url} up in {time.monotonic() - started:.1f} s (pid {pid})", flush=True)
    users = Users(url)
    figures: dict[str, object] = {"concurrent": args.concurrent, "num_images": args.num_images}
    tallies: list[Tally] = []
    try:
        burst = run_phase(users, 0, args.concurrent, args.concurrent, args.num_images, args.model,
                          args.request_timeout)
        print(burst.line(f"burst of {args.concurrent} concurrent"), flush=True)
        rss_before = rss_mb(pid) if pid else float("nan")
        started = time.monotonic()
        soak, rss_trend = Tally(), []
        for first in range(0, args.total, SOAK_CHUNK):  # RSS after every chunk: flat, or growing?
            part = run_phase(users, args.concurrent + first, min(SOAK_CHUNK, args.total - first), args.concurrent,
                             args.num_images, args.model, args.request_timeout)
            soak.merge(part)
            rss_trend.append(round(rss_mb(pid), 1) if pid else float("nan"))
        soak_s = time.monotonic() - started
        rss_after = rss_trend[-1] if rss_trend else rss_before
        print(soak.line(f"soak of {args.total}"), flush=True)
        print(f"soak took {soak_s:.1f} s ({args.total / soak_s:.1f} requests/s); "
              f"server RSS before {rss_before:.0f} MiB, after {rss_after:.0f} MiB "
              f"({rss_after - rss_before:+.0f} MiB); every {SOAK_CHUNK} requests: {rss_trend} MiB", flush=True)
        tallies = [burst, soak]
        if args.overload:
            over = run_phase(users, args.concurrent + args.total, args.overload, args.overload, args.num_images,
                             args.model, args.request_timeout)
            print(over.line(f"overload of {args.overload} concurrent"), flush=True)
            for message, count in over.busy_answers.items():
                print(f"  busy answer x{count}: {message}", flush=True)
            tallies.append(over)
            figures["overload"] = {"concurrent": args.overload, "completed": over.completed,
                                   "rejected": over.rejected, "failed": len(over.failed), "mixed": len(over.mixed),
                                   "lost": over.lost, "busy_answers": dict(over.busy_answers)}
        for problem in [p for t in tallies for p in t.failed + t.mixed][:10]:
            print("  problem:", problem)
        figures |= {
            "burst": {"completed": burst.completed, "rejected": burst.rejected, "failed": len(burst.failed),
                      "mixed": len(burst.mixed), "lost": burst.lost, "latencies": burst.latencies,
                      "busy_answers": dict(burst.busy_answers)},
            "soak": {"total": args.total, "completed": soak.completed, "rejected": soak.rejected,
                     "failed": len(soak.failed), "mixed": len(soak.mixed), "lost": soak.lost,
                     "latencies": soak.latencies, "seconds": soak_s, "busy_answers": dict(soak.busy_answers)},
            "rss_before_mib": rss_before, "rss_after_mib": rss_after, "rss_every_chunk_mib": rss_trend,
        }
    finally:
        users.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    bad = sum(len(t.failed) + len(t.mixed) + t.lost for t in tallies)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
