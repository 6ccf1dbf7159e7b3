"""Text → ranked images, diffusers style: `DallePipeline.from_pretrained(...)(prompts)`.

Stages: tokenize (dalle_app.text) → encode + cross-attention K/V once per distinct text →
sample codes (dalle_app.sampling, one shared loop for all images) → VQGAN decode → CLIP score →
images ranked by score. A request may keep the top rows of a start picture's codes (image
completion: the sampler forces them as a prefix, per row, so completions share loops with plain
requests) and may ask for pictures that tile (the sampler wraps their code grid, the VQGAN
decodes it seamless). The lower-level
methods (`generate_codes`, `decode_images`, `preview_images`, `finish`) are what the request
scheduler (dalle_app.scheduler) builds on; it is also the one place that streams progress and
previews. Loaded pipelines are not cached here: the app's one model cache is `catalog.ModelPool`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from dalle_app import runtime
from dalle_app.hardware import free_memory_bytes
from dalle_app.hub import normalizer_word_file, resolve_model
from dalle_app.loop_size import largest_loop, loop_bytes_per_image
from dalle_app.models.clip import CLIP, load_clip
from dalle_app.models.dallebart import DalleBartModel, load_dallebart
from dalle_app.models.vqgan import VQGAN, load_vqgan, to_uint8
from dalle_app.request import (
    DEFAULT_NUM_IMAGES,
    DEFAULT_SAMPLING,
    MAX_SEED,
    RANDOM_SEED,
    Completion,
    GenerationRequest,
    SamplingSettings,
    random_seed,
)
from dalle_app.sampling import GenerationStopped, Sampler, batch_mesh, bucket_size, image_seed
from dalle_app.text import TextProcessor

BATCH_BUCKETS = (1, 2, 4, 9, 16, 32, 64)
"""Image-batch sizes that get their own compiled program (9 is the default request; the larger
ones are the loop sizes of dalle_app.loop_size)."""
TEXT_BUCKETS = (2, 4, 8, 16, 32, 64)
"""Numbers of distinct texts (prompts + unconditional inputs) the encoder is compiled for."""
WARMUP_SIZES = (1, 9)
"""Image counts compiled when a pipeline loads: one image (regenerating a seed) and the default 9."""
DECODE_BUCKETS = (1, 2, 4, 8)
"""VQGAN batch sizes; larger sets of images are decoded in chunks of the largest."""
STEP_PROBE = 8
"""Decoder steps timed per warm-up size to measure the loop step (for dalle_app.loop_size)."""
PREVIEW_GREY = 128
"""Pixel value of the not-yet-sampled part of a preview."""
PROGRESS_EVERY = 16
"""Decoder steps between progress callbacks when the caller gives no interval."""


class ModelMismatchError(ValueError):
    """The DalleBart checkpoint does not produce codes the VQGAN can decode."""


def check_request(request: GenerationRequest) -> None:
    """Reject requests the sampler cannot honour (dalle_app.validation does the user-facing
    cleaning; this guards the engine itself)."""
    num_images, seed = request.num_images, request.seed
    temperature, top_k, top_p, cond_scale = (request.sampling.temperature, request.sampling.top_k,
                                             request.sampling.top_p, request.sampling.cond_scale)
    problems = []
    if not (isinstance(num_images, (int, np.integer)) and num_images >= 1):
        problems.append(f"num_images must be a whole number ≥ 1, not {num_images!r}")
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed <= MAX_SEED):
        problems.append(f"seed must be a whole number from 0 to {MAX_SEED}, not {seed!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature must be > 0, not {temperature!r}")
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
        problems.append(f"top_k must be a whole number ≥ 0 (0 = off), not {top_k!r}")
    if not (np.isfinite(top_p) and 0 < top_p <= 1):
        problems.append(f"top_p must be in (0, 1] (1 = off), not {top_p!r}")
    if not np.isfinite(cond_scale):
        problems.append(f"cond_scale must be a finite number, not {cond_scale!r}")
    if problems:
        raise ValueError("; ".join(problems))


def check_completion(request: GenerationRequest, side: int, num_codes: int) -> None:
    """Reject a completion this model cannot run: its codes must fill the `side` x `side` grid
    with ids below `num_codes`, and it must keep from 1 to side - 1 rows."""
    completion = request.completion
    if completion is None:
        return
    problems = []
    if len(completion.codes) != side * side:
        problems.append(f"the start picture has {len(completion.codes)} codes, the model draws {side * side}")
    elif not all(0 <= c < num_codes for c in completion.codes):
        problems.append(f"the start picture's codes must be from 0 to {num_codes - 1}")
    if not (isinstance(completion.keep_rows, (int, np.integer)) and 1 <= completion.keep_rows < side):
        problems.append(f"keep_rows must be a whole number from 1 to {side - 1}, not {completion.keep_rows!r}")
    if problems:
        raise ValueError("; ".join(problems))


def is_out_of_memory(error: BaseException) -> bool:
    """XLA reports allocation failures as XlaRuntimeError RESOURCE_EXHAUSTED."""
    return "RESOURCE_EXHAUSTED" in str(error) or isinstance(error, MemoryError)


@dataclass(frozen=True)
class ImageSpec:
    """One image to sample: the request it belongs to (its texts and settings) and its own seed."""

    request: GenerationRequest
    seed: int


def image_rows(request: GenerationRequest, first: int = 0) -> list[ImageSpec]:
    """The request's images; image i gets `image_seed(request.seed, first + i)`."""
    return [ImageSpec(request, image_seed(request.seed, first + i)) for i in range(request.num_images)]


@dataclass
class GeneratedImage:
    image: Image.Image
    score: float      # CLIP logits_per_image (exp(logit_scale)·cosine); nan without CLIP
    seed: int         # regenerate this image alone with num_images=1, seed=seed
    codes: np.ndarray  # (image_length,) int32 VQGAN codes


@dataclass
class PipelineOutput:
    images: list[list[GeneratedImage]]   # per prompt, ranked by CLIP score (best first)
    prompts: list[str]
    timings: dict[str, float]            # encode_s, generate_s, decode_s, clip_s, total_s
    normalized: list[str] = field(default_factory=list)  # the text the model saw, per prompt
    truncated: list[bool] = field(default_factory=list)  # prompt longer than the text length


class DallePipeline:
    """A loaded DalleBart + VQGAN (+ CLIP) with compiled sampling programs."""

    def __init__(self, dalle: DalleBartModel, text: TextProcessor, vqgan: VQGAN,
                 clip: CLIP | None = None, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 devices: list[Any] | None = None) -> None:
        check_compatible(dalle, vqgan)
        if clip is not None and clip.tokenizer is None:
            raise ModelMismatchError(
                "the CLIP folder has no tokenizer files (tokenizer.json, or vocab.json and "
                "merges.txt), so it cannot score prompts: add them, or pass clip=False to skip "
                "ranking")
        mesh = batch_mesh(devices)
        self.sampler = Sampler(dalle, mesh)
        self.sampler.num_codes = min(dalle.config.image_vocab_size, vqgan.config.n_embed)
        self.dalle = self.sampler.model  # with a mesh, the model with replicated weights
        self.text = text
        self.vqgan = vqgan
        self.clip = clip
        self.dtype = dalle.dtype
        self.batch_buckets = tuple(batch_buckets)
        self.step_s: dict[int, float] = {}  # measured loop step time per warm image count
        self._warm: set[int] = set()

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, dalle: str | os.PathLike | None = None,
                        vqgan: str | os.PathLike | None = None,
                        clip: str | os.PathLike | None | bool = None, dtype: Any = None,
                        warmup: Sequence[int] = WARMUP_SIZES, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                        ) -> "DallePipeline":
        """Load a pipeline (each call loads anew: catalog.ModelPool keeps the loaded ones).

        dalle / vqgan / clip: a name of dalle_app.hub.NAMED_MODELS ("mini", "mega", "vqgan",
        "clip"), a hub repo id, or a local folder; None means the embedded default model.
        clip=False skips ranking (scores are nan, images keep their sampling order).
        dtype: "float32", "bfloat16", "float16" (weights are cast once), None = the backend's
        default (float32 on CPU, bfloat16 on GPU/TPU).
        warmup: image-batch sizes to compile at load (default: 1 and 9 images; () for none).
        With JAX's persistent compilation cache ($DALLE_APP_JAX_CACHE) a restart loads the
        compiled programs from disk instead of compiling again.
        """
        runtime.configure()
        compute = runtime.resolve_dtype(dtype)
        dalle_dir = resolve_model(dalle, "dalle")
        vqgan_dir = resolve_model(vqgan, "vqgan")
        clip_dir = None if clip is False else resolve_model(clip if clip is not True else None, "clip")
        # VQGAN and CLIP run once per image, not per step: float32 costs little there and avoids
        # fp16 overflow in the VQGAN's group norms.
        pipe = cls(load_dallebart(dalle_dir, compute), TextProcessor.from_pretrained(dalle_dir, normalizer_word_file(dalle_dir)),
                   load_vqgan(vqgan_dir), None if clip_dir is None else load_clip(clip_dir), batch_buckets)
        if warmup:
            pipe.warmup(warmup)
        return pipe

    @property
    def image_length(self) -> int:
        """Decoder steps per image (= codes per image)."""
        return self.dalle.config.image_length

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError for a request this pipeline cannot run (settings, completion)."""
        check_request(request)
        check_completion(request, self.vqgan.config.latent_size, self.sampler.num_codes)

    def warmup(self, batch_sizes: Sequence[int] = WARMUP_SIZES) -> float:
        """Compile the programs for these image-batch sizes (running the VQGAN and CLIP once on
        blank codes) and time their loop step (`step_s`); returns the seconds it took. Sizes
        already warm are skipped."""
        start = time.perf_counter()
        for n in batch_sizes:
            if n in self._warm:
                continue
            self._warm.add(n)
            rows = image_rows(GenerationRequest("warm up", num_images=n, seed=0))
            self.generate_codes(rows, steps=0)
            self.step_s[n] = self._time_step(rows)
            codes = np.zeros((n, self.image_length), np.int32)
            images = self.decode_images(codes)
            if self.clip is not None:
                self.clip.score(images, ["warm up"])
        return time.perf_counter() - start

    def _time_step(self, rows: Sequence[ImageSpec]) -> float:
        """Seconds per decoder step of the compiled loop for these rows: a run of STEP_PROBE
        steps less a run of none (both include the loop's setup)."""
        probe = min(STEP_PROBE, self.image_length)
        setup = self.generate_codes(rows, steps=0)[1]["generate_s"]
        run = self.generate_codes(rows, steps=probe)[1]["generate_s"]
        return max(0.0, run - setup) / probe

    def loop_images(self) -> int:
        """Images per decoding loop on this device (dalle_app.loop_size): from the step times
        measured at warm-up and the memory free now, at most the largest batch bucket."""
        cfg = self.dalle.config
        per_image = loop_bytes_per_image(cfg.decoder_layers, cfg.d_model, cfg.image_length, cfg.max_text_length,
                                         cfg.image_vocab_size, np.dtype(self.dtype).itemsize)
        chosen = largest_loop(self.step_s, per_image // self.sampler.num_devices, free_memory_bytes())
        return min(chosen, max(self.batch_buckets))

    # ---- one call -------------------------------------------------------------------------

    def __call__(self, prompts: str | list[str], num_images: int = DEFAULT_NUM_IMAGES,
                 seed: int = RANDOM_SEED, temperature: float = DEFAULT_SAMPLING.temperature,
                 top_k: int = DEFAULT_SAMPLING.top_k, top_p: float = DEFAULT_SAMPLING.top_p,
                 cond_scale: float = DEFAULT_SAMPLING.cond_scale, negative_prompt: str = "",
                 completions: Sequence[Completion | None] | None = None, seamless: bool = False,
                 ) -> PipelineOutput:
        """Generate `num_images` images per prompt, ranked by CLIP score (no progress: for
        progress events and previews submit a `GenerationRequest` to dalle_app.scheduler).

        seed: -1 picks one at random. Image j of the call (prompt-major order) uses the seed
        `image_seed(seed, j)`, reported as `GeneratedImage.seed`.
        negative_prompt replaces the empty unconditional input of super-conditioning.
        completions: per prompt, the start picture to complete (None: draw the whole image).
        seamless: decode pictures that tile.
        """
        started = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        seed = random_seed() if seed is None or seed < 0 else int(seed)
        sampling = SamplingSettings(temperature, top_k, top_p, cond_scale)
        completions = list(completions) if completions is not None else [None] * len(prompts)
        if len(completions) != len(prompts):
            raise ValueError(f"give one completion (or None) per prompt: {len(completions)} for {len(prompts)} prompts")
        requests = [GenerationRequest(p, negative_prompt, num_images=num_images, seed=seed, sampling=sampling,
                                      completion=c, seamless=seamless)
                    for p, c in zip(prompts, completions)]
        for request in requests:
            self.check(request)
        groups = [image_rows(request, j * num_images) for j, request in enumerate(requests)]
        rows = [r for g in groups for r in g]
        codes, timings = [], {"encode_s": 0.0, "generate_s": 0.0}
        loop = self.loop_images()
        for start in range(0, len(rows), loop):
            part_codes, t = self.generate_codes(rows[start:start + loop])
            codes.append(part_codes)
            timings = {k: timings[k] + t[k] for k in timings}
        return self.finish(prompts, groups, np.concatenate(codes), timings, started)

    # ---- stages (also used by the scheduler) ----------------------------------------------

    def generate_codes(self, rows: Sequence[ImageSpec],
                       progress: Callable[[int, int, np.ndarray], Any] | None = None,
                       progress_every: int | None = None, steps: int | None = None,
                       ) -> tuple[np.ndarray, dict[str, float]]:
        """Sample codes (len(rows), image_length) for any mix of prompts and settings in ONE loop.

        The batch is padded to a bucket size (rows beyond len(rows) are discarded).
        `progress(step, total, codes[:, :step])` as in Sampler.generate; returning False stops
        (GenerationStopped). Returns the codes and {encode_s, generate_s}.
        `steps=0` only compiles and runs the setup (warm-up).
        """
        if not rows:
            raise ValueError("no images to generate")
        t0 = time.perf_counter()
        batch = bucket_size(len(rows), self.batch_buckets, self.sampler.num_devices)
        padded = list(rows) + [rows[0]] * (batch - len(rows))
        texts: dict[tuple, int] = {}
        ids, masks = [], []

        def text_index(prompt: str, negative: bool) -> int:
            key = (negative, prompt)
            if key not in texts:
                tokens = (self.text([prompt]) if not negative
                          else self.text([prompt], prompt if prompt else None))
                i, m = ((tokens.input_ids[0], tokens.attention_mask[0]) if not negative
                        else (tokens.input_ids_uncond[0], tokens.attention_mask_uncond[0]))
                texts[key] = len(ids)
                ids.append(i)
                masks.append(m)
            return texts[key]

        cond = np.array([text_index(r.request.prompt, False) for r in padded], np.int32)
        uncond = np.array([text_index(r.request.negative_prompt, True) for r in padded], np.int32)
        n_texts = bucket_size(len(ids), TEXT_BUCKETS)
        ids_arr = np.stack(ids + [ids[0]] * (n_texts - len(ids)))
        masks_arr = np.stack(masks + [masks[0]] * (n_texts - len(masks)))
        cross = self.sampler.encode_texts(ids_arr, masks_arr)
        jax.block_until_ready(cross)
        t1 = time.perf_counter()
        field_array = lambda name, dtype: np.array([getattr(r.request.sampling, name) for r in padded], dtype)
        prefix_codes = np.zeros((batch, self.image_length), np.int32)
        prefix_length = np.zeros(batch, np.int32)
        for i, row in enumerate(padded):
            if row.request.completion is not None:
                prefix_codes[i] = row.request.completion.codes
                prefix_length[i] = row.request.completion.kept_codes(self.vqgan.config.latent_size)
        codes = self.sampler.generate(
            cross, masks_arr, cond, uncond, np.array([r.seed for r in padded], np.int64),
            field_array("temperature", np.float32), field_array("top_k", np.int32),
            field_array("top_p", np.float32), field_array("cond_scale", np.float32),
            progress=None if progress is None else (lambda s, t, c: progress(s, t, c[:len(rows)])),
            progress_every=progress_every or PROGRESS_EVERY, steps=steps,
            prefix_codes=prefix_codes, prefix_length=prefix_length,
            wrap=np.array([r.request.seamless for r in padded], bool))
        t2 = time.perf_counter()
        return codes[:len(rows)], {"encode_s": t1 - t0, "generate_s": t2 - t1}

    def decode_images(self, codes: np.ndarray, seamless: bool = False) -> list[Image.Image]:
        """VQGAN codes (N, image_length) → N RGB images, decoded in bucketed batches (`seamless`:
        pictures that tile)."""
        codes = np.asarray(codes, np.int32)
        out: list[Image.Image] = []
        chunk = max(DECODE_BUCKETS)
        for start in range(0, len(codes), chunk):
            part = codes[start:start + chunk]
            size = bucket_size(len(part), DECODE_BUCKETS)
            padded = np.concatenate([part, np.zeros((size - len(part), part.shape[1]), np.int32)])
            pixels = np.asarray(to_uint8(self.vqgan.decode(padded, seamless)))[:len(part)]
            out.extend(Image.fromarray(p) for p in pixels)
        return out

    def preview_images(self, partial_codes: np.ndarray) -> list[Image.Image]:
        """Images of unfinished code sequences (N, t): the part not yet sampled is grey."""
        partial_codes = np.asarray(partial_codes, np.int32)
        n, t = partial_codes.shape
        codes = np.zeros((n, self.image_length), np.int32)
        codes[:, :t] = partial_codes
        grid = self.vqgan.config.latent_size
        images = self.decode_images(codes)
        if t >= self.image_length:
            return images
        out = []
        for image in images:
            pixels = np.array(image)
            cell = pixels.shape[0] // grid
            row, col = divmod(t, grid)
            pixels[row * cell:(row + 1) * cell, col * cell:] = PREVIEW_GREY
            pixels[(row + 1) * cell:] = PREVIEW_GREY
            out.append(Image.fromarray(pixels))
        return out

    def score(self, prompt: str, images: list[Image.Image]) -> np.ndarray:
        """CLIP logits_per_image of each image against its prompt (nan without CLIP)."""
        if self.clip is None:
            return np.full(len(images), np.nan, np.float32)
        return np.asarray(self.clip.score(images, [prompt]))[:, 0]

    def finish(self, prompts: list[str], groups: list[list[ImageSpec]], codes: np.ndarray,
               timings: dict[str, float], started: float | None = None) -> PipelineOutput:
        """Decode, score and rank; `groups[i]` are the rows of prompts[i], in `codes` order."""
        t0 = time.perf_counter()
        images, offset = [], 0
        for group in groups:  # a group is one request: decoded seamless or not as it asks
            images += self.decode_images(codes[offset:offset + len(group)], group[0].request.seamless)
            offset += len(group)
        t1 = time.perf_counter()
        ranked: list[list[GeneratedImage]] = []
        offset = 0
        for prompt, group in zip(prompts, groups):
            own = images[offset:offset + len(group)]
            scores = self.score(prompt, own)
            items = [GeneratedImage(img, float(s), r.seed, codes[offset + i])
                     for i, (img, s, r) in enumerate(zip(own, scores, group))]
            if self.clip is not None:
                items.sort(key=lambda g: -g.score)
            ranked.append(items)
            offset += len(group)
        t2 = time.perf_counter()
        tokens = self.text(prompts)
        timings = {**timings, "decode_s": t1 - t0, "clip_s": t2 - t1}
        timings["total_s"] = (t2 - started) if started is not None else sum(timings.values())
        return PipelineOutput(ranked, prompts, timings, tokens.normalized, tokens.truncated)


def check_compatible(dalle: DalleBartModel, vqgan: VQGAN) -> None:
    """The DalleBart must emit as many codes as the VQGAN grid holds, from its codebook."""
    grid = vqgan.config.latent_size ** 2
    problems = []
    if dalle.config.image_length != grid:
        problems.append(f"the DalleBart emits image_length={dalle.config.image_length} codes per "
                        f"image but the VQGAN decodes a {vqgan.config.latent_size}×"
                        f"{vqgan.config.latent_size} grid ({grid} codes)")
    if dalle.config.image_vocab_size < vqgan.config.n_embed:
        problems.append(f"the DalleBart's image_vocab_size={dalle.config.image_vocab_size} is "
                        f"smaller than the VQGAN codebook (n_embed={vqgan.config.n_embed})")
    if problems:
        raise ModelMismatchError(
            "These models do not belong together: " + "; ".join(problems)
            + ". Use the VQGAN the DalleBart was trained with (DALL·E Mini/Mega: "
            "dalle-mini/vqgan_imagenet_f16_16384).")


__all__ = [
    "DallePipeline", "GeneratedImage", "GenerationStopped", "ImageSpec", "ModelMismatchError",
    "PipelineOutput", "check_compatible", "check_completion", "check_request", "image_rows", "is_out_of_memory",
]
