"""The image-token sampler: pure functions compiled once per batch-size bucket.

What makes it fast (see benchmarks/README.md):
- the encoder runs once per *distinct* text (prompts and unconditional inputs together), and the
  cross-attention keys/values of every decoder layer are computed once from it, then gathered
  for every image row;
- each step is ONE decoder pass over the stacked conditional + unconditional rows, against a
  self-attention KV cache, so a step reads the decoder weights once;
- the whole loop runs inside XLA (a `fori_loop` with traced bounds), in chunks of any length so
  the caller can report progress and partial images without recompiling;
- temperature, top-k, top-p and the guidance scale are per-row *traced* arrays, so one compiled
  program serves any mix of requests batched together.

Sampling follows dalle-mini 0.1.5 (MODEL_NOTES.md §3): `ℓ = ℓ_u + s·(ℓ_c − ℓ_u)`, then
temperature, top-k, top-p (keep tokens whose cumulative probability before them is < p, at
least one), then a categorical draw — all in float32. Unlike the original, ids that are not
image codes (≥ image_vocab_size) are never sampled: the VQGAN cannot decode them.

Seeds: every image row has its own PRNG key, PRNGKey(seed of that image), split once per step
(`k_sample, k_next = split(k)`), so an image depends only on its seed and its request — not on
the batch size, its position in the batch or what else is batched with it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalle_app.models.dallebart import KV, DalleBartModel

BATCH_AXIS = "batch"


class GenerationStopped(RuntimeError):
    """The progress callback asked to stop (e.g. every request in the batch was cancelled)."""


# ----------------------------------------------------------------------------------------------
# Logit warpers (pure, per-row parameters)


def guide(cond: jax.Array, uncond: jax.Array, cond_scale: jax.Array) -> jax.Array:
    """Super-conditioning: uncond + s·(cond − uncond), s per row (B,)."""
    return uncond + cond_scale[:, None] * (cond - uncond)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  num_codes: int) -> jax.Array:
    """Temperature, then top-k, then top-p, per row; removed tokens become -inf.

    logits (B, V) float32; temperature (B,) > 0; top_k (B,) int (0 = off); top_p (B,) in (0, 1]
    (1 = off). Ids ≥ num_codes are removed first. Ties are broken towards the lower id, as
    `lax.top_k` does in the original.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    logits = jnp.where(jnp.arange(vocab) < num_codes, logits, -jnp.inf)
    logits = logits / temperature[:, None].astype(jnp.float32)
    order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, lower id first on ties
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)
    keep = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
    ranked = jnp.where(keep, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)  # mass of the better tokens, exclusive:
    before = jnp.concatenate([jnp.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank[None, :] == 0)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep_by_id = jnp.zeros_like(keep).at[rows, order].set(keep)
    return jnp.where(keep_by_id, logits, -jnp.inf)


def sample(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row with that row's own key: (B, 2) keys, (B, V) → (B,) int32."""
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, logits).astype(jnp.int32)


def split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: (key for this step's draw, key carried to the next step)."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


def image_keys(seeds: np.ndarray) -> jax.Array:
    """Raw uint32 PRNG keys (B, 2), one per image seed."""
    return jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(seeds, np.uint32)))


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request with seed `seed`."""
    return (int(seed) + int(index)) % 2**31


# ----------------------------------------------------------------------------------------------
# The loop


class Settings(NamedTuple):
    """Per-row sampling settings, each (B,)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    cond_scale: jax.Array


class LoopState(NamedTuple):
    """Everything the decoding loop carries; rows are images, the cache has 2 rows per image
    (conditional, unconditional), interleaved so a data-parallel shard keeps pairs together."""

    cache: KV            # (layers, 2B, image_length, H, hd)
    cross: KV            # (layers, 2B, text_length, H, hd)
    encoder_mask: jax.Array  # (2B, text_length)
    tokens: jax.Array    # (B,) the token to feed at `position`
    codes: jax.Array     # (B, image_length) sampled codes so far
    keys: jax.Array      # (B, 2)
    position: jax.Array  # () int32, next position to decode
    settings: Settings


def batch_mesh(devices: list[Any] | None = None) -> Mesh | None:
    """A 1-D data-parallel mesh over all local devices (None with a single device)."""
    devices = devices if devices is not None else jax.local_devices()
    if len(devices) < 2:
        return None
    return Mesh(np.array(devices), (BATCH_AXIS,))


class Sampler:
    """Compiled sampling programs for one loaded DalleBart.

    jax.jit caches one executable per input shape, so each batch-size bucket (and each bucket
    of distinct texts for `encode_texts`) compiles once; the sampling settings are traced.
    With a mesh, image rows are split over its devices (data parallel); the results are the
    same as on one device.
    """

    def __init__(self, model: DalleBartModel, mesh: Mesh | None = None) -> None:
        self.model = model
        self.config = model.config
        self.mesh = mesh
        self.image_length = model.config.image_length
        self.num_codes = model.config.image_vocab_size
        self._encode = jax.jit(self._encode_texts)
        self._start = jax.jit(self._start_loop)
        self._run = jax.jit(self._run_loop, donate_argnums=(1,))

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    # ---- programs -------------------------------------------------------------------------

    def _encode_texts(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> KV:
        hidden = self.model.encode(params, input_ids, attention_mask)
        return self.model.cross_kv(params, hidden)

    def _shard(self, x: jax.Array, axis: int) -> jax.Array:
        if self.mesh is None:
            return x
        spec = [None] * x.ndim
        spec[axis] = BATCH_AXIS
        return lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def _start_loop(self, cross_texts: KV, mask_texts: jax.Array, text_rows: jax.Array,
                    seeds: jax.Array, settings: Settings) -> LoopState:
        """Gather every row's cross K/V and mask, make the cache, keys and BOS tokens.

        text_rows (2B,) int32: for each cache row (cond, uncond interleaved), its text index.
        """
        batch = seeds.shape[0]
        cross = KV(*(self._shard(jnp.take(x, text_rows, axis=1), 1) for x in cross_texts))
        cache = KV(*(self._shard(x, 1) for x in self.model.init_cache(2 * batch)))
        bos = jnp.full((batch,), self.config.decoder_start_token_id, jnp.int32)
        return LoopState(
            cache=cache,
            cross=cross,
            encoder_mask=self._shard(jnp.take(mask_texts, text_rows, axis=0), 0),
            tokens=self._shard(bos, 0),
            codes=self._shard(jnp.zeros((batch, self.image_length), jnp.int32), 0),
            keys=self._shard(jax.vmap(jax.random.PRNGKey)(seeds.astype(jnp.uint32)), 0),
            position=jnp.zeros((), jnp.int32),
            settings=Settings(*(self._shard(x, 0) for x in settings)),
        )

    def _run_loop(self, params: Any, state: LoopState, stop: jax.Array) -> LoopState:
        """Decode positions state.position .. stop-1 (traced bounds: one program for any chunk)."""
        s = state.settings

        def step(position: jax.Array, carry: tuple) -> tuple:
            cache, tokens, codes, keys = carry
            logits, cache = self.model.decode_step(
                params, jnp.repeat(tokens, 2), position, cache, state.cross, state.encoder_mask)
            logits = logits.reshape(tokens.shape[0], 2, -1)
            mixed = guide(logits[:, 0], logits[:, 1], s.cond_scale)
            mixed = filter_logits(mixed, s.temperature, s.top_k, s.top_p, self.num_codes)
            draw_keys, keys = split_keys(keys)
            tokens = sample(draw_keys, mixed)
            codes = lax.dynamic_update_slice(codes, tokens[:, None], (0, position))
            return cache, tokens, codes, keys

        carry = (state.cache, state.tokens, state.codes, state.keys)
        cache, tokens, codes, keys = lax.fori_loop(state.position, stop, step, carry)
        return state._replace(cache=cache, tokens=tokens, codes=codes, keys=keys, position=stop)

    # ---- host side ------------------------------------------------------------------------

    def encode_texts(self, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> KV:
        """Cross-attention K/V of U distinct texts, (layers, U, text_length, H, hd) each."""
        return self._encode(params, jnp.asarray(input_ids, jnp.int32),
                            jnp.asarray(attention_mask, jnp.int32))

    def generate(self, params: Any, cross_texts: KV, mask_texts: np.ndarray,
                 cond_text: np.ndarray, uncond_text: np.ndarray, seeds: np.ndarray,
                 temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                 cond_scale: np.ndarray, progress: Callable[[int, int, np.ndarray], Any] | None = None,
                 progress_every: int | None = None, steps: int | None = None) -> np.ndarray:
        """Sample B images; returns codes (B, image_length) int32.

        cond_text/uncond_text (B,) index the rows of `cross_texts`/`mask_texts` used as each
        image's conditional and unconditional input. B must be a multiple of `num_devices`
        (pad with dummy rows). `progress(step, total, codes[:, :step])` is called every
        `progress_every` steps; if it returns False, GenerationStopped is raised. `steps` stops
        early (0 = compile and set up only, for warm-up).
        """
        batch = len(seeds)
        text_rows = np.stack([cond_text, uncond_text], axis=1).reshape(-1).astype(np.int32)
        settings = Settings(
            jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32), jnp.asarray(cond_scale, jnp.float32))
        if batch % self.num_devices:
            raise ValueError(f"batch {batch} is not a multiple of the {self.num_devices} devices")
        state = self._start(cross_texts, jnp.asarray(mask_texts, jnp.int32),
                            jnp.asarray(text_rows), jnp.asarray(np.asarray(seeds, np.int64) % 2**32,
                                                                jnp.uint32), settings)
        total = self.image_length if steps is None else steps
        every = total if (progress is None or not progress_every) else max(1, int(progress_every))
        done = 0
        while True:
            done = min(total, done + max(every, 1))
            state = self._run(params, state, jnp.asarray(done, jnp.int32))
            if done >= total:
                break
            if progress is not None:
                if progress(done, self.image_length, np.asarray(state.codes[:, :done])) is False:
                    raise GenerationStopped("generation stopped by the progress callback")
        codes = np.asarray(state.codes)
        if progress is not None and total == self.image_length:
            progress(total, total, codes)
        return codes


def bucket_size(n: int, buckets: tuple[int, ...], multiple: int = 1) -> int:
    """Smallest bucket ≥ n (then rounded up to a multiple of the device count); beyond the
    largest bucket, the next multiple of it."""
    size = next((b for b in sorted(buckets) if b >= n), None)
    if size is None:
        top = max(buckets)
        size = -(-n // top) * top
    return -(-size // multiple) * multiple


__all__ = [
    "GenerationStopped", "LoopState", "Sampler", "Settings", "batch_mesh", "bucket_size",
    "filter_logits", "guide", "image_keys", "image_seed", "sample", "split_keys",
]
