"""Throughput of the app in images per second: `python app.py` against Ray Serve with N replicas.

For each setting it starts the real command on a free 127.0.0.1 port (`python app.py`, or
`python -m dalle_app.serve --replicas N`), sends one untimed round of requests (compiles what
the model compiles on first use), then times `--requests` requests of `--images` images from
`--users` concurrent clients and prints images/s, with the CPU model and the load average
(other processes on the machine slow every setting alike).

    python benchmarks/serve_throughput.py                      # single process, 1 and 2 replicas
    python benchmarks/serve_throughput.py --replicas 0,4 --gpus-per-replica 1
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (benchmarks/load.py: the CPU model)

ROOT = Path(__file__).resolve().parents[1]
READY_MARKER = "is listening on"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(replicas: int, gpus: float | None, warmup: str, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """The app (replicas == 0) or its Ray Serve form, once it listens; returns (process, URL)."""
    env = os.environ | {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(free_port()),
                        "DALLE_APP_WARMUP": warmup, "PYTHONUNBUFFERED": "1",
                        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    command = [sys.executable, "app.py"]
    if replicas:
        command = [sys.executable, "-m", "dalle_app.serve", "--replicas", str(replicas)]
        if gpus is not None:
            command += ["--gpus-per-replica", str(gpus)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    assert proc.stdout is not None
    deadline, tail = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        tail = (tail + [line])[-40:]
        if READY_MARKER in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, line.rsplit(" ", 1)[-1].strip()
    stop(proc)
    raise SystemExit(f"{' '.join(command)} did not start:\n" + "".join(tail))


def stop(proc: subprocess.Popen) -> None:
    """Interrupt like Ctrl-C, so the Ray form shuts its cluster down."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_round(clients: list[Client], requests: int, images: int, offset: int) -> tuple[int, float, dict]:
    """`requests` requests spread over the clients; returns (images generated, seconds, replica → requests)."""
    spread: dict[str, int] = {}
    lock = threading.Lock()

    def user(u: int) -> int:
        made = 0
        for i in range(u, requests, len(clients)):
            _, summary = clients[u].predict(prompt=f"a red square above a blue circle #{offset + i}",
                                            num_images=images, seed=offset + i, api_name="/generate")
            made += summary["num_images"]
            with lock:
                spread[summary.get("replica", "?")] = spread.get(summary.get("replica", "?"), 0) + 1
        return made

    started = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        made = sum(pool.map(user, range(len(clients))))
    return made, time.perf_counter() - started, spread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="0,1,2", help="settings to compare; 0 = `python app.py` "
                        "(default 0,1,2)")
    parser.add_argument("--users", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=32, help="timed requests per setting (default 32)")
    parser.add_argument("--images", type=int, default=4, help="images per request (default 4)")
    parser.add_argument("--gpus-per-replica", type=float, help="passed to dalle_app.serve")
    parser.add_argument("--start-timeout", type=float, default=900)
    args = parser.parse_args(argv)
    print(f"CPU: {load.cpu_model()} ({os.cpu_count()} cores); {args.requests} requests of {args.images} images "
          f"from {args.users} clients per setting", flush=True)
    for replicas in (int(x) for x in args.replicas.split(",")):
        name = "python app.py" if replicas == 0 else f"dalle_app.serve --replicas {replicas}"
        proc, url = start(replicas, args.gpus_per_replica, f"{args.images},16", args.start_timeout)
        try:
            clients = [Client(url, verbose=False, download_files=False) for _ in range(args.users)]
            run_round(clients, args.users, args.images, offset=10_000)  # untimed: first-use compiles
            load_before = os.getloadavg()[0]
            made, seconds, spread = run_round(clients, args.requests, args.images, offset=0)
            print(f"{name}: {made / seconds:.2f} images/s ({made} images in {seconds:.1f} s; "
                  f"requests per replica {sorted(spread.values(), reverse=True)}; "
                  f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
            for c in clients:
                c.close()
        finally:
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
