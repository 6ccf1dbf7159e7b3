"""Reading checkpoint files and matching them against a model's expected parameter tree.

Only msgpack (flax.serialization format) and safetensors are ever read: never pickle.
Shapes and names are checked here, in one place, so every model reports a bad checkpoint
the same way: the path, the expected and the found shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: msgpack checkpoints may hold it)
import msgpack
import numpy as np

Tree = dict[str, Any]
Flat = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit the model's configuration."""


def _ndarray_ext_hook(code: int, data: bytes) -> Any:
    """Decode flax.serialization's ndarray extension (code 1) without an extra copy."""
    if code == 1:
        # The payload is [shape, dtype name, raw bytes]; the raw bytes are its tail, so read the
        # small header and view the tail in place (unpacking it would copy the tensor once more).
        header = msgpack.Unpacker(raw=False)
        header.feed(data[:256])
        header.read_array_header()
        shape, dtype = header.unpack(), np.dtype(header.unpack())
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return np.frombuffer(data, dtype=dtype, offset=len(data) - nbytes).reshape(shape)
    if code in (2, 3):  # native complex / numpy scalar: not used by any checkpoint we load
        raise CheckpointError("unsupported msgpack extension in checkpoint (complex or scalar)")
    return msgpack.ExtType(code, data)


def read_msgpack(path: str | os.PathLike) -> Tree:
    """Read a `flax_model.msgpack` into a nested dict of numpy arrays.

    The file is streamed through msgpack's Unpacker, so at no point do the raw file bytes and
    the decoded arrays both sit in memory in full (what `msgpack_restore(f.read())` would do).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(
                f, ext_hook=_ndarray_ext_hook, raw=False, max_buffer_size=2**34,
                strict_map_key=False, read_size=16 * 2**20,
            )
            tree = unpacker.unpack()
    except CheckpointError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for corrupt data
        raise CheckpointError(
            f"could not read {path}: the file is corrupt or not a flax msgpack checkpoint "
            f"({type(e).__name__}: {e}). Delete it and download it again."
        ) from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path} does not hold a parameter tree (found {type(tree).__name__})")
    return tree


def read_safetensors(path: str | os.PathLike) -> Flat:
    """Read a `model.safetensors` into a flat {name: numpy array} dict (bf16 becomes fp32)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        # numpy has no bfloat16: fall back to reading through the flax-friendly path.
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            return _read_safetensors_bf16(path)
        raise CheckpointError(
            f"could not read {path}: the file is corrupt or not a safetensors file ({e}). "
            "Delete it and download it again."
        ) from e


def _read_safetensors_bf16(path: Path) -> Flat:
    from safetensors import safe_open

    out: Flat = {}
    with safe_open(str(path), framework="flax") as f:
        for name in f.keys():
            out[name] = np.asarray(f.get_tensor(name))
    return out


def flatten(tree: Mapping[str, Any], sep: str = "/") -> Flat:
    """Nested dict → {"a/b/c": leaf}."""
    flat: Flat = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(tree, "")
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Tree:
    """{"a/b/c": leaf} → nested dict."""
    tree: Tree = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def check_shapes(found: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped parameter."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        (k, tuple(expected[k]), tuple(np.shape(found[k])))
        for k in sorted(set(expected) & set(found))
        if tuple(np.shape(found[k])) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not match the model built from its config.json:"]
    for k, exp, got in wrong[:20]:
        lines.append(f"  parameter {k}: expected shape {exp}, found {got}")
    for k in missing[:20]:
        lines.append(f"  missing parameter {k} (expected shape {tuple(expected[k])})")
    for k in unexpected[:20]:
        lines.append(f"  unexpected parameter {k} (shape {tuple(np.shape(found[k]))})")
    hidden = len(wrong) + len(missing) + len(unexpected) - (len(lines) - 1)
    if hidden > 0:
        lines.append(f"  ... and {hidden} more")
    lines.append("Check that config.json and the weight file come from the same checkpoint.")
    raise CheckpointError("\n".join(lines))


def expected_shapes(init_fn: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of the parameters `init_fn` would create, without allocating them."""
    import jax

    abstract = jax.eval_shape(init_fn)
    params = abstract.get("params", abstract) if isinstance(abstract, Mapping) else abstract
    return {k: tuple(v.shape) for k, v in flatten(params).items()}


def to_device_tree(flat: Flat, dtype: Any | None = None) -> Tree:
    """Move leaves to the default device one at a time (optionally cast), freeing each host copy.

    Popping as we go keeps peak memory near one copy of the weights instead of two. Each
    transfer is waited for: with asynchronous dispatch every host array would otherwise stay
    alive until all copies finish, which is two full copies again.
    """
    import jax
    import jax.numpy as jnp

    out: Flat = {}
    for key in list(flat.keys()):
        leaf = flat.pop(key)
        is_float = jnp.issubdtype(leaf.dtype, jnp.floating)
        out[key] = jax.block_until_ready(jnp.asarray(leaf, dtype=dtype if (dtype is not None and is_float) else None))
        del leaf
    return unflatten(out)
