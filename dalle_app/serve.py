"""`python -m dalle_app.serve`: the same app, its models served by Ray Serve replicas.

    python -m dalle_app.serve                      # one replica per GPU (one CPU replica without GPUs)
    python -m dalle_app.serve --replicas 2
    python -m dalle_app.serve --min-replicas 1 --max-replicas 8
    python -m dalle_app.serve --address auto       # join the cluster `ray start` runs on this machine
    python -m dalle_app.serve --address head:6379   # from a node of that cluster

Without `--address` it starts a private Ray cluster on this machine, bound to 127.0.0.1 (but for
the one gRPC port Ray Serve opens in each replica: docs/scale-out.md), with Ray's dashboard and
metrics off, and stops it on exit. The Gradio UI and `/generate` API are
the ones of `python app.py` (dalle_app.ui), on GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
(127.0.0.1:7860 by default); every request is validated there and generated on a replica.
Ray is an optional dependency (requirements-serve.txt): it is imported only here and in
dalle_app.serve_backend.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping, Sequence

from dalle_app.admission import positive_int_env
from dalle_app.loop_size import LOOP_SIZES
from dalle_app.scheduler import MAX_QUEUED_IMAGES, MAX_QUEUED_IMAGES_ENV

log = logging.getLogger(__name__)

LOOPBACK_ENV = {
    # Ray's "no cluster" mode: every Ray server of the private cluster listens on 127.0.0.1 only
    # (on Linux Ray otherwise binds its gRPC servers to all interfaces).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # nothing leaves the machine
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Set before Ray is imported when this process starts its own cluster (Ray reads them then)."""
DEPLOYMENT_NAME = "GenerationReplica"
MAX_QUEUED_REQUESTS = 64
"""Requests the front end holds while every replica is full (then: "busy"). Requests arriving
together wait here for a moment before being routed, so this is also the largest burst that
is never turned away when the replicas have room."""
TARGET_ONGOING_REQUESTS = LOOP_SIZES[0]
"""Autoscaling target: ongoing requests per replica (a full decoding loop of one-image jobs on
any device)."""
FORWARDED_ENV = ("DALLE_APP_", "HF_")
"""Environment variables (by prefix) the replicas get from the front end: the model list and
default, the compilation cache, offline mode."""


def max_ongoing_requests(env: Mapping[str, str]) -> int:
    """Requests one replica holds at once: as many one-image requests as its scheduler lets wait
    (bigger ones meet the scheduler's own image bound, "busy", first), plus the largest loop's worth.
    Serve's default (5) would keep most users out of each decoding loop."""
    return positive_int_env(env, MAX_QUEUED_IMAGES_ENV, MAX_QUEUED_IMAGES) + max(LOOP_SIZES)


def forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """The front end's settings the replicas need (a replica on another machine has its own environment)."""
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV)}


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and what each one reserves.

    Fixed: `replicas`. Autoscaled: `min_replicas`..`max_replicas`, adding replicas while the
    ongoing requests per replica exceed `target_ongoing_requests`.
    """

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = TARGET_ONGOING_REQUESTS
    gpus_per_replica: float = 0
    cpus_per_replica: float = 1

    def deployment_options(self, env: Mapping[str, str]) -> dict[str, Any]:
        options: dict[str, Any] = dict(
            name=DEPLOYMENT_NAME,
            max_ongoing_requests=max_ongoing_requests(env),
            max_queued_requests=MAX_QUEUED_REQUESTS,
            logging_config={"enable_access_log": False},  # a line per request: the front end logs enough
            ray_actor_options={
                "num_cpus": self.cpus_per_replica,
                "num_gpus": self.gpus_per_replica,
                "runtime_env": {"env_vars": forwarded_env(env)},
            },
        )
        if self.min_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


@dataclass
class Cluster:
    """The Ray cluster the front end is connected to, and whether it started it."""

    owns_cluster: bool
    handle: Any = None

    def close(self) -> None:
        from dalle_app.serve_backend import shut_down

        shut_down(self.owns_cluster)


def connect(address: str | None, num_cpus: int | None = None,
            env: MutableMapping[str, str] = os.environ) -> Cluster:
    """Join the cluster at `address`, or start a private one on loopback when it is None."""
    if address is None:
        if "ray" in sys.modules and any(env.get(k) != v for k, v in LOOPBACK_ENV.items()):
            raise RuntimeError("Ray was imported before its loopback settings were made; "
                               "call dalle_app.serve.connect before importing ray")
        env.update(LOOPBACK_ENV)
    import ray

    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 _system_config={"enable_metrics_collection": False})
        return Cluster(owns_cluster=True)
    ray.init(address=address, log_to_driver=True)
    return Cluster(owns_cluster=False)


def default_scaling(args: argparse.Namespace, cluster_resources: Mapping[str, float]) -> Any:
    """The `Scaling` the options ask for: GPUs when the cluster has them, one replica per GPU."""
    gpus = float(cluster_resources.get("GPU", 0))
    per_gpu = args.gpus_per_replica if args.gpus_per_replica is not None else (1 if gpus else 0)
    if args.min_replicas is not None:
        return Scaling(replicas=None, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       target_ongoing_requests=args.target_ongoing_requests,
                       gpus_per_replica=per_gpu, cpus_per_replica=args.cpus_per_replica)
    replicas = args.replicas or (max(1, int(gpus // per_gpu)) if per_gpu else 1)
    return Scaling(replicas=replicas, gpus_per_replica=per_gpu, cpus_per_replica=args.cpus_per_replica)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_app.serve",
        description="Serve the DALL·E Mini app with its models on Ray Serve replicas.",
    )
    parser.add_argument("--replicas", type=int, help="a fixed number of replicas (default: one per GPU, "
                        "or 1 without GPUs)")
    parser.add_argument("--min-replicas", type=int, help="autoscale from this many replicas...")
    parser.add_argument("--max-replicas", type=int, help="...up to this many")
    parser.add_argument("--target-ongoing-requests", type=float, default=TARGET_ONGOING_REQUESTS,
                        help="autoscaling adds replicas above this many requests per replica "
                        f"(default {TARGET_ONGOING_REQUESTS})")
    parser.add_argument("--address", help="an existing Ray cluster this machine is a node of: 'auto' (the "
                        "one `ray start` runs here) or HEAD:6379; default: a private cluster on 127.0.0.1")
    parser.add_argument("--gpus-per-replica", type=float, help="GPUs each replica reserves "
                        "(default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves "
                        "(default 1)")
    args = parser.parse_args(argv)
    autoscaled = args.min_replicas is not None or args.max_replicas is not None
    if autoscaled and args.replicas is not None:
        parser.error("give either --replicas or --min-replicas/--max-replicas, not both")
    if autoscaled and (args.min_replicas is None or args.max_replicas is None):
        parser.error("autoscaling needs both --min-replicas and --max-replicas")
    if args.replicas is not None and args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if autoscaled and not 1 <= args.min_replicas <= args.max_replicas:
        parser.error("need 1 <= --min-replicas <= --max-replicas")
    if args.address and args.address.startswith("ray://"):
        parser.error("Ray Serve cannot stream to a front end connected through Ray Client (ray://): run this "
                     "command on a node of the cluster (e.g. the head) with --address auto")
    if args.target_ongoing_requests <= 0:
        parser.error("--target-ongoing-requests must be > 0")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0 or args.cpus_per_replica < 0:
        parser.error("--gpus-per-replica and --cpus-per-replica cannot be negative")
    return args


class ReplicaModels:
    """What the UI asks the model pool about the default model, answered for the replicas: each
    one loads the default model before the app starts listening."""

    def __init__(self, catalog: Any) -> None:
        self.catalog = catalog

    def active_default(self) -> str:
        return self.catalog.default

    def default_loading(self) -> bool:
        return False

    def default_status(self) -> str:
        entry = self.catalog.entries[self.catalog.default]
        why = f", because {self.catalog.default_reason}" if self.catalog.default_reason else ""
        return f"Model: {entry.label}{why} (served by Ray Serve replicas)."


def build_front_end(catalog: Any, handle: Any) -> Any:
    """The app of `python app.py` with the replicas behind its handlers."""
    from dalle_app.serve_backend import RayBackend
    from dalle_app.ui import Handlers, build_app

    models = ReplicaModels(catalog)
    return build_app(catalog, models, handlers=Handlers(catalog, models, backend=RayBackend(handle)))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    from dalle_app.ui import launch_kwargs, warmup_sizes

    from dalle_app.catalog import DEFAULT_MODEL_ENV, Catalog

    started = time.perf_counter()
    catalog = Catalog.from_env()
    cluster = connect(args.address)
    try:
        import ray

        from dalle_app.serve_backend import deploy

        scaling = default_scaling(args, ray.cluster_resources())
        print(f"Starting the model replicas ({scaling})...", flush=True)
        env = {**os.environ, DEFAULT_MODEL_ENV: catalog.default}  # the replicas' default is the front end's
        cluster.handle = deploy(scaling.deployment_options(env), warmup_sizes())
        print(f"Replicas ready in {time.perf_counter() - started:.1f} s", flush=True)
        demo = build_front_end(catalog, cluster.handle)
        _, url, _ = demo.launch(prevent_thread_lock=True, **launch_kwargs())
        print(f"dalle_app (Ray Serve) is listening on {url}", flush=True)
        demo.block_thread()
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
