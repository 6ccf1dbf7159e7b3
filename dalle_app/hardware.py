"""What this machine offers the app: accelerator memory, a memory budget for loaded models, the
memory free now for a decoding loop, a warning when a GPU is present but JAX cannot use it, and
where compiled programs can persist.

Kept apart from runtime.py (which configures JAX) so the model catalog can ask these questions
without configuring anything; JAX is imported only by the functions that need it.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

MEMORY_ENV = "DALLE_APP_MEMORY_GB"
MEMORY_SHARE = 0.8
"""Share of the machine's memory (RAM, or the accelerator's when JAX has one) that loaded models
may use by default; the rest is for the server, Gradio and the operating system."""
PERSISTENT_STORAGE = Path("/data")
"""A Space's persistent storage mount, where one exists (the Hub no longer offers it for new Spaces)."""


CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
"""XLA options for the engine's programs on CPU: without XLA's default YNNPACK dot fusion, XLA's
own dot streams the decoder weights about twice as fast for the 18 rows of 9 images and somewhat
faster for 2 rows (benchmarks/README.md, `benchmarks/cpu_floor.py`). The VQGAN's training steps
(and its decoder fine-tune) use them too, as its convolutions run faster without the fusion, and
so does CLIP's, which runs the same either way. DalleBart's training step does not: its products
of thousands of rows run faster with the fusion (`benchmarks/train_steps.py`,
docs/embedded-model.md, Time)."""


def compiler_options() -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for this machine: `CPU_COMPILER_OPTIONS` on CPU, else None."""
    import jax

    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def accelerator_memory_gb() -> float | None:
    """Memory JAX may use on its first accelerator, in GB; None when JAX runs on the CPU."""
    limit = _accelerator_memory_stats().get("bytes_limit")
    return limit / 1e9 if limit else None


def _accelerator_memory_stats() -> dict:
    """JAX's memory statistics of its first accelerator; empty when JAX runs on the CPU."""
    import jax

    if jax.default_backend() == "cpu":
        return {}
    return jax.local_devices()[0].memory_stats() or {}


def free_memory_bytes() -> float:
    """Bytes free now where the loop state lives: the first accelerator's (its limit less what JAX
    holds), or the machine's available RAM when JAX runs on the CPU."""
    stats = _accelerator_memory_stats()
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return (1 - MEMORY_SHARE) * machine_memory_gb() * 1e9


def machine_memory_gb() -> float:
    """Physical memory of this machine, in GB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def memory_budget_gb(env: Mapping[str, str] | None = None) -> float:
    """GB the loaded models may use together: $DALLE_APP_MEMORY_GB, else MEMORY_SHARE of the
    accelerator's memory (when JAX has one) or of the machine's RAM."""
    env = os.environ if env is None else env
    text = env.get(MEMORY_ENV, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{MEMORY_ENV} must be a number of GB greater than 0 (got {text!r})")
        return value
    accelerator = accelerator_memory_gb()
    return MEMORY_SHARE * (accelerator if accelerator is not None else machine_memory_gb())


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU is attached to this machine (device files or the driver's tool)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def gpu_backend_warning() -> str | None:
    """A warning when a GPU is visible but JAX runs on the CPU (CPU-only JAX installed), else None."""
    if not nvidia_gpu_visible():
        return None
    import jax

    if jax.default_backend() != "cpu":
        return None
    return ("A GPU is attached but JAX runs on the CPU: JAX's CUDA wheels are not installed. "
            "Install requirements-gpu.txt (on a Space: copy it over requirements.txt) to use the GPU.")


def compilation_cache_dir() -> Path:
    """Where JAX keeps compiled programs between restarts: the Space's persistent storage when it
    exists and is writable, else the user's cache folder."""
    if PERSISTENT_STORAGE.is_dir() and os.access(PERSISTENT_STORAGE, os.W_OK):
        return PERSISTENT_STORAGE / "dalle_app" / "jax"
    return Path.home() / ".cache" / "dalle_app" / "jax"
