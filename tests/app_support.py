"""Shared by the app's tests: a tiny random model set that loads in seconds, and a live server.

The tiny set is the reference DalleBart (16 codes per image, 64-code vocabulary) with a matching
random VQGAN (16×16 pixels, 4×4 codes) and the reference CLIP: random weights, real code paths.
"""

from __future__ import annotations

import json
import shutil
import string
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def read_metadata(path: Path) -> dict:
    """The parameters a PNG written by the app carries (its `parameters` text chunk, as JSON)."""
    from PIL import Image

    from dalle_app.images import METADATA_KEY

    with Image.open(path) as image:
        image.load()
        text = getattr(image, "text", {}) or {}
    assert METADATA_KEY in text, f"{path} has no {METADATA_KEY!r} text chunk"
    return json.loads(text[METADATA_KEY])


def make_tiny_models(root: Path) -> dict[str, str]:
    """Write the tiny model set under `root`; returns the parts of a catalog entry."""
    import numpy as np

    from dalle_app.models.vqgan import VQGANConfig, param_shapes, save_vqgan
    from dalle_app.models.weights import unflatten

    root.mkdir(parents=True, exist_ok=True)
    dalle, vqgan, clip = root / "dalle", root / "vqgan", root / "clip"
    if not (dalle / "config.json").exists():
        shutil.copytree(REFERENCE / "dallebart_tiny_a", dalle, ignore=shutil.ignore_patterns("expected*"))
    if not (clip / "config.json").exists():
        shutil.copytree(REFERENCE / "clip_tiny_safetensors", clip, ignore=shutil.ignore_patterns("expected*"))
        write_tiny_clip_tokenizer(clip)
    if not (vqgan / "config.json").exists():
        config = VQGANConfig(ch=32, num_res_blocks=1, resolution=16, z_channels=8, ch_mult=(1, 2, 2),
                             attn_resolutions=(), n_embed=64, embed_dim=8)
        rng = np.random.default_rng(0)  # random weights without compiling the model's init
        flat = {path: (np.ones(shape) if path.endswith("scale") else rng.normal(0, 0.2, shape)).astype(np.float32)
                for path, shape in param_shapes(config).items()}
        save_vqgan(vqgan, config, unflatten(flat))
    return {"dalle": str(dalle), "vqgan": str(vqgan), "clip": str(clip)}


def write_tiny_clip_tokenizer(folder: Path) -> None:
    """A character-level CLIP vocabulary that fits the reference CLIP's 99 text tokens."""
    letters = string.ascii_lowercase
    vocab = {token: i for i, token in enumerate([*letters, *(c + "</w>" for c in letters)])}
    vocab |= {f"<|unused{i}|>": i for i in range(len(vocab), 97)}
    vocab |= {"<|startoftext|>": 97, "<|endoftext|>": 98}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_model_spec(parts: dict[str, str]) -> str:
    """The $DALLE_APP_MODELS form of the tiny set: dalle+vqgan+clip."""
    return "+".join(parts[k] for k in ("dalle", "vqgan", "clip"))


@contextmanager
def serve(demo, **kwargs) -> Iterator[str]:
    """Launch `demo` on a free loopback port in this process; yields its URL."""
    from dalle_app.ui import launch_kwargs

    options = launch_kwargs() | dict(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1") | kwargs
    _, url, _ = demo.launch(**options)
    try:
        yield url
    finally:
        demo.close()


class SlowPipeline:
    """A real pipeline whose decoding loop sleeps at each progress report, so a test can act
    (cancel, submit more) while a loop is running. While `gate` is clear, a loop stops right
    after each progress report until the gate is set (or set and cleared again: one more step),
    at most a minute."""

    def __init__(self, pipeline, delay_s: float) -> None:
        self._pipeline = pipeline
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate_codes(self, rows, progress=None, progress_every=None, steps=None):
        def slowly(step, total, codes):
            time.sleep(self.delay_s)
            carry_on = progress(step, total, codes)
            self.gate.wait(60)
            return carry_on

        return self._pipeline.generate_codes(rows, None if progress is None else slowly, progress_every, steps)


def recording_scheduler(pipeline, **kwargs):
    """A dalle_app Scheduler that keeps a list of its jobs in `.jobs`."""
    from dalle_app.scheduler import Scheduler

    class Recording(Scheduler):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.jobs = []

        def submit(self, request):
            job = super().submit(request)
            self.jobs.append(job)
            return job

    return Recording(pipeline, **kwargs)


class OutOfMemoryPipeline(SlowPipeline):
    """A real pipeline that fails like XLA does when a decoding loop has more than `max_rows` images."""

    def __init__(self, pipeline, max_rows: int) -> None:
        super().__init__(pipeline, 0.0)
        self.max_rows = max_rows
        self.loop_sizes: list[int] = []

    def generate_codes(self, rows, progress=None, progress_every=None, steps=None):
        self.loop_sizes.append(len(rows))
        if len(rows) > self.max_rows:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")
        return super().generate_codes(rows, progress, progress_every, steps)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")
