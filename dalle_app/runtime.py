"""JAX process setup shared by the pipeline, the benchmarks and the tests.

Two process-wide JAX settings matter for this app and are set here, in one place:
- the PRNG implementation, so a seed gives the same image on one device or many;
- the persistent compilation cache, so a restarted server does not recompile the sampler.
It also picks the default compute dtype per backend (measured, see benchmarks/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dalle_app.hardware import compilation_cache_dir

CACHE_ENV = "DALLE_APP_JAX_CACHE"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def configure(cache_dir: str | os.PathLike | None | bool = None) -> Path | None:
    """Pin the RNG implementation and turn on the persistent compilation cache.

    `jax_threefry_partitionable=True` is set explicitly (it is JAX's default since 0.5): random
    bits then do not depend on how a batch is sharded over devices. Note that this differs from
    the jax 0.3/0.4 stream that dalle-mini 0.1.5 used, so seeds do not reproduce its samples.

    The compilation cache directory is `cache_dir`, else $DALLE_APP_JAX_CACHE, else
    hardware.compilation_cache_dir() (a Space's /data when it exists, else ~/.cache/dalle_app/jax);
    `cache_dir=False` or an empty $DALLE_APP_JAX_CACHE disables it.
    Returns the directory used (or None). Safe to call more than once.
    """
    jax.config.update("jax_threefry_partitionable", True)
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        env = os.environ.get(CACHE_ENV)
        if env is not None and env.strip() == "":
            return None
        cache_dir = env or compilation_cache_dir()
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home: run without a persistent cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program that took a while to compile, however small its binary.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def default_dtype(backend: str | None = None) -> Any:
    """The compute dtype to use when the caller gives none.

    CPU: float32, because XLA's CPU bf16/fp16 matmuls are several times slower than fp32
    (benchmarks/README.md). GPU/TPU: bfloat16 (half the memory traffic, no fp16 overflow).
    """
    backend = backend or jax.default_backend()
    return jnp.float32 if backend == "cpu" else jnp.bfloat16


def resolve_dtype(dtype: Any = None) -> Any:
    """Accept None (backend default), a name ("float32", "bfloat16", "float16") or a jnp dtype."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}") from None
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name
