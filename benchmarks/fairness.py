"""The fair-queue scenario over the app's real API, on loopback only.

Starts `python app.py` on a free 127.0.0.1 port (or uses --url, which must be loopback), then
1. idle: one 16-image request on the idle server (after one to warm it up): the yardstick;
2. greedy: one client (one gradio_client, so one session) sends --greedy requests of
   --greedy-images images all at once;
3. polite: --delay seconds later, --polite other clients send one --polite-images request each.
It waits for the polite requests, then cancels whatever the greedy client still has queued
(--wait-greedy waits for it instead), and prints what each side got: completed, refused with
the per-client message, refused as busy, failed; the polite latencies and the slowest one over
the idle request. Exits 1 when a polite request did not complete or the slowest took more than
--max-ratio times the idle request.

    python benchmarks/fairness.py                       # 80 x 16 images, then 8 x 1 image, 3 s later
    python benchmarks/fairness.py --url http://127.0.0.1:7860 --json fairness.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (benchmarks/load.py: starting the server, busy answers)

PER_CLIENT_MARKER = "images waiting (at most"
"""Part of the per-client refusal ("You already have N images waiting (at most N per visitor)...")."""
CANCEL_GRACE_S = 30.0
"""Seconds given to the greedy client's cancelled requests to end before the figures are taken."""


@dataclass
class Outcome:
    """One request: when it was sent and how it ended."""

    name: str
    sent: float
    ended: float | None = None
    kind: str = "pending"  # completed, per-client, busy, failed, cancelled
    message: str = ""
    stopped: bool = False  # cancelled by the benchmark

    @property
    def latency(self) -> float | None:
        return None if self.ended is None else self.ended - self.sent


@dataclass
class Side:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def latencies(self) -> list[float]:
        return sorted(o.latency for o in self.outcomes if o.kind == "completed" and o.latency is not None)

    def summary(self) -> dict[str, object]:
        messages = sorted({o.message for o in self.outcomes if o.message})
        return {kind: self.count(kind) for kind in ("completed", "per-client", "busy", "failed", "cancelled",
                                                     "pending")} | {"latencies_s": self.latencies(),
                                                                    "messages": messages}


def classify(error: BaseException) -> tuple[str, str]:
    text = str(error)
    if PER_CLIENT_MARKER in text:
        return "per-client", text
    if any(m in text.lower() for m in load.BUSY_MARKERS):
        return "busy", text
    return "failed", f"{type(error).__name__}: {text}"


def send(client: Client, name: str, prompt: str, images: int, seed: int, side: Side,
         lock: threading.Lock) -> tuple[object, Outcome]:
    """Submit one request now; its outcome is filled in when it ends."""
    outcome = Outcome(name, time.monotonic())
    with lock:
        side.outcomes.append(outcome)
    job = client.submit(prompt=prompt, num_images=images, seed=seed, api_name="/generate")

    def ended(done_job) -> None:
        now = time.monotonic()
        try:
            gallery, summary = done_job.result(timeout=0)
        except BaseException as e:  # noqa: BLE001 (every way a request ends is a figure)
            kind, message = ("cancelled", "") if outcome.stopped or done_job.cancelled() else classify(e)
        else:
            ok = summary.get("prompt") == prompt and len(gallery) == images
            kind, message = ("completed", "") if ok else ("failed", f"mixed up: got {summary.get('prompt')!r}")
        with lock:
            outcome.ended, outcome.kind, outcome.message = now, kind, message

    job.add_done_callback(ended)
    return job, outcome


def timed_request(client: Client, images: int, seed: int) -> float:
    started = time.monotonic()
    client.predict(prompt=load.prompt_for(seed), num_images=images, seed=seed, api_name="/generate")
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running app (loopback only); default: start python app.py")
    parser.add_argument("--model", help="model name or dalle+vqgan+clip spec (default: the server's default)")
    parser.add_argument("--greedy", type=int, default=80, help="requests the greedy client sends at once")
    parser.add_argument("--greedy-images", type=int, default=16)
    parser.add_argument("--polite", type=int, default=8, help="polite clients, one request each")
    parser.add_argument("--polite-images", type=int, default=1)
    parser.add_argument("--delay", type=float, default=3.0, help="seconds between the greedy and the polite requests")
    parser.add_argument("--max-ratio", type=float, default=4.0, help="slowest polite request / idle 16-image request")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the polite requests")
    parser.add_argument("--wait-greedy", action="store_true", help="wait for the greedy requests instead of cancelling")
    parser.add_argument("--warmup", default="1,2,4,9,16", help="batch sizes the server compiles first")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.greedy > 200 or args.polite > 64:
        parser.error("bounded: --greedy ≤ 200, --polite ≤ 64")

    proc = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must be a loopback address")
        url = args.url
    else:
        started = time.monotonic()
        proc, url = load.start_server(args.model, args.warmup, timeout_s=900)
        print(f"server {url} up in {time.monotonic() - started:.1f} s", flush=True)
    figures: dict[str, object] = {"cpu": load.cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    clients: list[Client] = []
    greedy_side, polite_side, lock = Side(), Side(), threading.Lock()
    try:
        def client(**kwargs) -> Client:
            c = Client(url, verbose=False, download_files=False,
                       httpx_kwargs={"timeout": load.REQUEST_HTTP_TIMEOUT_S}, **kwargs)
            clients.append(c)
            return c

        yardstick = client()
        timed_request(yardstick, 16, 1)  # warm: the first request also pays for one-off work
        idle_s = timed_request(yardstick, 16, 2)
        print(f"idle 16-image request: {idle_s:.1f} s", flush=True)
        greedy = client(max_workers=args.greedy + 8)
        polite = [client() for _ in range(args.polite)]

        began = time.monotonic()
        greedy_jobs = [send(greedy, f"greedy {i}", load.prompt_for(100 + i), args.greedy_images, 100 + i,
                            greedy_side, lock) for i in range(args.greedy)]
        time.sleep(max(0.0, began + args.delay - time.monotonic()))
        polite_jobs = [send(c, f"polite {i}", load.prompt_for(500 + i), args.polite_images, 500 + i,
                            polite_side, lock) for i, c in enumerate(polite)]
        deadline = time.monotonic() + args.timeout
        for job, _ in polite_jobs:
            try:
                job.result(timeout=max(0.1, deadline - time.monotonic()))
            except BaseException:  # noqa: BLE001 (counted by its callback; a timeout stays "pending")
                pass
        for job, outcome in greedy_jobs:
            if args.wait_greedy:
                try:
                    job.result(timeout=max(0.1, deadline - time.monotonic()))
                except BaseException:  # noqa: BLE001
                    pass
            elif not job.done():
                outcome.stopped = True
                job.cancel()
        grace = time.monotonic() + CANCEL_GRACE_S
        while not all(j.done() for j, _ in greedy_jobs) and time.monotonic() < grace:
            time.sleep(0.2)
        time.sleep(1.0)  # the last done callbacks
        with lock:
            for o in greedy_side.outcomes:
                if o.kind == "pending" and o.stopped:
                    o.kind = "cancelled"  # still queued or running when the benchmark stopped it
        figures |= {"idle_16_s": idle_s, "greedy": greedy_side.summary(), "polite": polite_side.summary(),
                    "load_after": os.getloadavg()}
    finally:
        for c in clients:
            c.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except Exception:  # noqa: BLE001
                proc.kill()

    g, p = figures["greedy"], figures["polite"]
    lat = p["latencies_s"]
    slowest = max(lat) if len(lat) == args.polite else float("inf")
    figures["slowest_polite_over_idle"] = slowest / idle_s
    print(f"greedy client, {args.greedy} x {args.greedy_images} images: completed {g['completed']}, refused with "
          f"the per-client message {g['per-client']}, busy {g['busy']}, failed {g['failed']}, "
          f"cancelled when the polite requests were done {g['cancelled']}")
    print(f"polite clients, {args.polite} x {args.polite_images} image(s) {args.delay:g} s later: completed "
          f"{p['completed']}, per-client {p['per-client']}, busy {p['busy']}, failed {p['failed']}, "
          f"not done within {args.timeout:g} s {p['pending']}")
    print("polite latencies (s): " + ", ".join(f"{x:.1f}" for x in lat))
    print(f"slowest polite / idle 16-image request: {figures['slowest_polite_over_idle']:.2f} "
          f"(limit {args.max_ratio:g})")
    for message in sorted(set(g["messages"]) | set(p["messages"])):
        print(f"  answer: {message}")
    print(f"CPU: {figures['cpu']} ({figures['cores']} cores); load average before "
          f"{figures['load_before'][0]:.1f}, after {figures['load_after'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if p["completed"] == args.polite and figures["slowest_polite_over_idle"] <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
