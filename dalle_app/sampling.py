"""The image-token sampler: pure functions compiled once per batch-size bucket.

The decoder itself is the model's (dalle_app.models.dallebart: `cross_kv`, `decode_hidden`,
`logits`); this module only samples. What makes it fast (see benchmarks/README.md):
- the encoder runs once per *distinct* text (prompts and unconditional inputs together), and the
  cross-attention keys/values of every decoder layer are computed once from it, then gathered
  for every image row;
- each step is ONE decoder pass over the stacked conditional + unconditional rows, against a
  self-attention KV cache (one head-major buffer per layer, updated in place), so a step reads
  the decoder weights once;
- guidance mixes the final hidden states, so the lm_head runs on one row per image, not two;
- the whole loop runs inside XLA (a `fori_loop` with traced bounds), in chunks of any length so
  the caller can report progress and partial images without recompiling;
- temperature, top-k, top-p, the guidance scale and the forced prefix are per-row *traced*
  arrays, so one compiled program serves any mix of requests batched together.

Sampling follows dalle-mini 0.1.5's `generate`: `ℓ = ℓ_u + s·(ℓ_c − ℓ_u)`, then temperature,
top-k, top-p (keep tokens whose cumulative probability before them is < p, at least one), then
a categorical draw — all in float32. Unlike the original, ids that are not image codes
(≥ image_vocab_size) are never sampled: the VQGAN cannot decode them.

Forced prefixes (image completion): a row may fix its first `prefix_length` codes. The prefix
that all rows share is run through the decoder in one multi-position pass that fills the cache;
the rest is forced row by row inside the loop, so completion rows and plain rows share a loop.

Tileable rows (`wrap`): the code grid is read as a torus. The last code of every grid row
copies that row's first code and the last grid row copies the first, in place of a draw, so
what the model draws next follows on from a border that continues across the wrap; the VQGAN
then decodes the grid seamless (dalle_app.models.vqgan). Like the prefix it is per row, so
tileable and plain rows share a loop.

Seeds: every image row has its own PRNG key, PRNGKey(seed of that image), split once per
position (`k_sample, k_next = split(k)`) whether the position is sampled or forced, so an image
depends only on its seed, its request and its prefix — not on the batch size, its position in
the batch or what else is batched with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalle_app.hardware import compiler_options
from dalle_app.models.dallebart import KV, DalleBartModel

BATCH_AXIS = "batch"

class GenerationStopped(RuntimeError):
    """The progress callback asked to stop (e.g. every request in the batch was cancelled)."""


# ----------------------------------------------------------------------------------------------
# Logit warpers (pure, per-row parameters)


def guide(cond: jax.Array, uncond: jax.Array, cond_scale: jax.Array) -> jax.Array:
    """Super-conditioning: uncond + s·(cond − uncond), s per row (B,)."""
    return uncond + cond_scale[:, None] * (cond - uncond)


TOP_K_FAST = 256
"""When every row's top_k is in 1..TOP_K_FAST, the sampler ranks only that many candidates
(lax.top_k) instead of sorting the whole vocabulary: same tokens, a fraction of the time."""


def _scaled(logits: jax.Array, temperature: jax.Array, num_codes: int) -> jax.Array:
    """float32 logits with non-image ids at -inf, divided by the per-row temperature."""
    logits = logits.astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < num_codes, logits, -jnp.inf)
    return logits / temperature[:, None].astype(jnp.float32)


def _keep_ranked(ranked: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Which of the best-first candidates survive top-k then top-p (at least the best one).

    top-p keeps the tokens whose cumulative probability *before* them is < p, i.e. those
    below p plus the first that crosses it, as transformers' FlaxTopPLogitsWarper does.
    """
    rank = jnp.arange(ranked.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    return keep & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank == 0))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  num_codes: int) -> jax.Array:
    """Temperature, then top-k, then top-p, per row; removed tokens become -inf.

    logits (B, V) float32; temperature (B,) > 0; top_k (B,) int (0 = off); top_p (B,) in (0, 1]
    (1 = off). Ids ≥ num_codes are removed first. Ties are broken towards the lower id, as
    `lax.top_k` does in the original.
    """
    scaled = _scaled(logits, temperature, num_codes)
    order = jnp.argsort(-scaled, axis=-1, stable=True)  # best first, lower id first on ties
    keep = _keep_ranked(jnp.take_along_axis(scaled, order, axis=-1), top_k, top_p)
    rows = jnp.arange(scaled.shape[0])[:, None]
    keep_by_id = jnp.zeros_like(keep).at[rows, order].set(keep)
    return jnp.where(keep_by_id, scaled, -jnp.inf)


def sample(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row with that row's own key: (B, 2) keys, (B, V) → (B,) int32.

    The Gumbel-max trick, as jax.random.categorical: argmax(logits + Gumbel noise of the key).
    """
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def sample_filtered(keys: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                    top_p: jax.Array, num_codes: int) -> jax.Array:
    """`sample(keys, filter_logits(logits, ...))` without sorting the whole vocabulary.

    Each row's Gumbel noise covers the whole vocabulary and is looked up by token id, so the
    result is the same token whichever path runs — it does not depend on the other rows.
    """
    scaled = _scaled(logits, temperature, num_codes)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:], jnp.float32))(keys)
    width = min(TOP_K_FAST, scaled.shape[-1])

    def draw(ranked: jax.Array, ids: jax.Array) -> jax.Array:
        keep = _keep_ranked(ranked, top_k, top_p)
        scores = jnp.where(keep, ranked + jnp.take_along_axis(noise, ids, axis=-1), -jnp.inf)
        return jnp.take_along_axis(ids, jnp.argmax(scores, axis=-1)[:, None], axis=-1)[:, 0]

    def few(_: None) -> jax.Array:
        ranked, ids = lax.top_k(scaled, width)
        return draw(ranked, ids)

    def all_ids(_: None) -> jax.Array:
        ids = jnp.argsort(-scaled, axis=-1, stable=True)
        return draw(jnp.take_along_axis(scaled, ids, axis=-1), ids)

    small_k = jnp.all((top_k > 0) & (top_k <= width))
    return lax.cond(small_k, few, all_ids, None).astype(jnp.int32)


def split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: (key for this step's draw, key carried to the next step)."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


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
    """Everything the decoding loop carries; rows are images, the caches have 2 rows per image
    (conditional, unconditional), interleaved so a data-parallel shard keeps pairs together."""

    cache: KV            # per layer (2B, H, image_length, hd)
    cross: KV            # per layer (2B, H, text_length, hd)
    mask: jax.Array      # (2B, text_length) the text masks
    tokens: jax.Array    # (B,) the token to feed at `position`
    codes: jax.Array     # (B, image_length) codes so far
    keys: jax.Array      # (B, 2)
    position: jax.Array  # () int32, next position to decode
    prefix_codes: jax.Array   # (B, image_length) forced codes
    prefix_length: jax.Array  # (B,) int32, positions < this take prefix_codes
    wrap: jax.Array           # (B,) bool, tileable rows (module docstring)
    settings: Settings


def guided_hidden(hidden: jax.Array, cond_scale: jax.Array) -> jax.Array:
    """Super-conditioning on the final hidden states: interleaved cond/uncond rows (2B, d) →
    (B, d). lm_head is linear without bias, so this equals guiding the logits."""
    pairs = hidden.astype(jnp.float32).reshape(-1, 2, hidden.shape[-1])
    return guide(pairs[:, 0], pairs[:, 1], cond_scale).astype(hidden.dtype)


def wrap_source(position: jax.Array, side: int) -> jax.Array:
    """The position whose code a tileable row copies at `position` of a side × side grid:
    the first row's code in the last row, the row's first code in the last column, else
    `position` itself (drawn)."""
    row, col = position // side, position % side
    return jnp.where(row == side - 1, col, jnp.where(col == side - 1, row * side, position))


def prefill_length(common: int, image_length: int) -> int:
    """Positions run by the one-pass prefill of a common prefix of `common` codes: the next
    power of two (one compiled program per bucket). Slots past `common` hold keys/values of
    placeholder tokens; each is overwritten at its own step before anything attends to it."""
    return min(image_length, 1 << max(common - 1, 0).bit_length())


def batch_mesh(devices: list[Any] | None = None) -> Mesh | None:
    """A 1-D data-parallel mesh over all local devices (None with a single device)."""
    devices = devices if devices is not None else jax.local_devices()
    if len(devices) < 2:
        return None
    return Mesh(np.array(devices), (BATCH_AXIS,))


class Sampler:
    """Compiled sampling programs for one loaded DalleBart.

    Runs the model's own cached decode on the model's parameters, read in place. jax.jit caches
    one executable per input shape, so each batch-size bucket (and each bucket of distinct
    texts for `encode_texts`, and of prefill lengths) compiles once; the sampling settings are
    traced. With a mesh, image rows are split over its devices (data parallel) and the weights
    replicated (`model` is then the model with the replicated weights); the results are the
    same as on one device.
    """

    def __init__(self, model: DalleBartModel, mesh: Mesh | None = None) -> None:
        self.config = model.config
        self.dtype = model.dtype
        self.mesh = mesh
        self.image_length = model.config.image_length
        self.num_codes = model.config.image_vocab_size
        self.side = int(np.sqrt(self.image_length))
        if mesh is not None:
            model = dataclasses.replace(model, params=jax.device_put(model.params, NamedSharding(mesh, P())))
        self.model = model
        options = compiler_options()
        self._encode = jax.jit(self._encode_texts, compiler_options=options)
        self._start = jax.jit(self._start_loop)
        self._prefill = jax.jit(self._prefill_prefix, donate_argnums=(1,), compiler_options=options)
        self._run = jax.jit(self._run_loop, donate_argnums=(1,), compiler_options=options)

    @property
    def params(self) -> Any:
        return self.model.params

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    # ---- programs -------------------------------------------------------------------------

    def _encode_texts(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> KV:
        return self.model.cross_kv(params, self.model.encode(params, input_ids, attention_mask))

    def _shard(self, x: jax.Array, axis: int = 0) -> jax.Array:
        if self.mesh is None:
            return x
        spec = [None] * x.ndim
        spec[axis] = BATCH_AXIS
        return lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def _start_loop(self, cross_texts: KV, mask_texts: jax.Array, text_rows: jax.Array,
                    seeds: jax.Array, settings: Settings, prefix_codes: jax.Array,
                    prefix_length: jax.Array, wrap: jax.Array) -> LoopState:
        """Gather every row's cross K/V and mask, make the cache, keys and BOS tokens.

        text_rows (2B,) int32: for each cache row (cond, uncond interleaved), its text index.
        """
        batch = seeds.shape[0]
        gather = lambda xs: tuple(self._shard(jnp.take(x, text_rows, axis=0)) for x in xs)
        cache = self.model.init_cache(2 * batch)
        bos = jnp.full((batch,), self.config.decoder_start_token_id, jnp.int32)
        return LoopState(
            cache=KV(*(tuple(self._shard(x) for x in xs) for xs in cache)),
            cross=KV(gather(cross_texts.k), gather(cross_texts.v)),
            mask=self._shard(jnp.take(mask_texts, text_rows, axis=0)),
            tokens=self._shard(bos),
            codes=self._shard(jnp.zeros((batch, self.image_length), jnp.int32)),
            keys=self._shard(jax.vmap(jax.random.PRNGKey)(seeds.astype(jnp.uint32))),
            position=jnp.zeros((), jnp.int32),
            prefix_codes=self._shard(prefix_codes),
            prefix_length=self._shard(prefix_length),
            wrap=self._shard(wrap),
            settings=Settings(*(self._shard(x) for x in settings)),
        )

    def _prefill_prefix(self, params: Any, state: LoopState, inputs: jax.Array, common: jax.Array) -> LoopState:
        """Run the first `common` positions, whose codes every row forces, in one pass.

        inputs (B, L) int32, L ≥ common: BOS then the prefix codes, the tokens fed at positions
        0..L-1. Fills the cache, takes the first `common` codes, and splits each row's key
        `common` times, as the loop would have.
        """
        _, cache = self.model.decode_hidden(params, self._shard(jnp.repeat(inputs, 2, axis=0)), 0, state.cache,
                                            state.cross, state.mask)
        keys = lax.fori_loop(0, common, lambda _, k: split_keys(k)[1], state.keys)
        taken = jnp.arange(self.image_length)[None, :] < common
        last = lax.dynamic_index_in_dim(state.prefix_codes, jnp.maximum(common - 1, 0), axis=1, keepdims=False)
        return state._replace(
            cache=cache, keys=keys, position=common.astype(jnp.int32),
            codes=jnp.where(taken, state.prefix_codes, state.codes),
            tokens=jnp.where(common > 0, last, state.tokens))

    def _run_loop(self, params: Any, state: LoopState, stop: jax.Array) -> LoopState:
        """Decode positions state.position .. stop-1 (traced bounds: one program for any chunk)."""
        s = state.settings

        def step(position: jax.Array, carry: tuple) -> tuple:
            cache, tokens, codes, keys = carry
            hidden, cache = self.model.decode_hidden(params, jnp.repeat(tokens, 2), position, cache,
                                                     state.cross, state.mask)
            logits = self.model.logits(params, guided_hidden(hidden, s.cond_scale))
            draw_keys, keys = split_keys(keys)
            drawn = sample_filtered(draw_keys, logits, s.temperature, s.top_k, s.top_p, self.num_codes)
            source = wrap_source(position, self.side)
            copied = lax.dynamic_index_in_dim(codes, source, axis=1, keepdims=False)
            drawn = jnp.where(state.wrap & (source != position), copied, drawn)
            forced = lax.dynamic_index_in_dim(state.prefix_codes, position, axis=1, keepdims=False)
            tokens = jnp.where(position < state.prefix_length, forced, drawn)
            codes = lax.dynamic_update_slice(codes, tokens[:, None], (0, position))
            return cache, tokens, codes, keys

        carry = (state.cache, state.tokens, state.codes, state.keys)
        cache, tokens, codes, keys = lax.fori_loop(state.position, stop, step, carry)
        return state._replace(cache=cache, tokens=tokens, codes=codes, keys=keys, position=stop)

    # ---- host side ------------------------------------------------------------------------

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> KV:
        """Cross-attention K/V of U distinct texts: per layer (U, H, text_length, hd)."""
        return self._encode(self.params, jnp.asarray(input_ids, jnp.int32),
                            jnp.asarray(attention_mask, jnp.int32))

    def _check_prefix(self, batch: int, prefix_codes: np.ndarray | None,
                      prefix_length: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The prefix arrays, validated (zeros when there is none)."""
        shape = (batch, self.image_length)
        if prefix_codes is None and prefix_length is None:
            return np.zeros(shape, np.int32), np.zeros(batch, np.int32)
        if prefix_codes is None or prefix_length is None:
            raise ValueError("give both prefix_codes and prefix_length, or neither")
        codes, length = np.asarray(prefix_codes), np.asarray(prefix_length)
        if codes.shape != shape or length.shape != (batch,):
            raise ValueError(f"prefix_codes must be {shape} and prefix_length ({batch},), "
                             f"not {codes.shape} and {length.shape}")
        if length.min() < 0 or length.max() > self.image_length:
            raise ValueError(f"prefix_length must be between 0 and {self.image_length}")
        forced = np.arange(self.image_length)[None, :] < length[:, None]
        if forced.any() and (codes[forced].min() < 0 or codes[forced].max() >= self.num_codes):
            raise ValueError(f"forced codes must be image codes in [0, {self.num_codes})")
        return np.where(forced, codes, 0).astype(np.int32), length.astype(np.int32)

    def generate(self, cross_texts: KV, mask_texts: np.ndarray,
                 cond_text: np.ndarray, uncond_text: np.ndarray, seeds: np.ndarray,
                 temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                 cond_scale: np.ndarray, progress: Callable[[int, int, np.ndarray], Any] | None = None,
                 progress_every: int | None = None, steps: int | None = None,
                 prefix_codes: np.ndarray | None = None, prefix_length: np.ndarray | None = None,
                 wrap: np.ndarray | None = None) -> np.ndarray:
        """Sample B images; returns codes (B, image_length) int32.

        cond_text/uncond_text (B,) index the rows of `cross_texts`/`mask_texts` used as each
        image's conditional and unconditional input. B must be a multiple of `num_devices`
        (pad with dummy rows). `progress(step, total, codes[:, :step])` is called every
        `progress_every` steps; if it returns False, GenerationStopped is raised. `steps` stops
        early (0 = compile and set up only, for warm-up).
        prefix_codes (B, image_length) int and prefix_length (B,) int: row i keeps
        prefix_codes[i, :prefix_length[i]] as its first codes (0 = plain generation).
        wrap (B,) bool: rows whose code grid wraps, for pictures that tile (module docstring).
        """
        batch = len(seeds)
        if batch % self.num_devices:
            raise ValueError(f"batch {batch} is not a multiple of the {self.num_devices} devices")
        prefix_codes, prefix_length = self._check_prefix(batch, prefix_codes, prefix_length)
        wrap = np.zeros(batch, bool) if wrap is None else np.asarray(wrap, bool)
        if wrap.shape != (batch,):
            raise ValueError(f"wrap must be ({batch},), not {wrap.shape}")
        if wrap.any() and self.side ** 2 != self.image_length:
            raise ValueError(f"tileable images need a square code grid, not {self.image_length} codes")
        text_rows = np.stack([cond_text, uncond_text], axis=1).reshape(-1).astype(np.int32)
        settings = Settings(
            jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
            jnp.asarray(top_p, jnp.float32), jnp.asarray(cond_scale, jnp.float32))
        state = self._start(cross_texts, jnp.asarray(mask_texts, jnp.int32), jnp.asarray(text_rows),
                            jnp.asarray(np.asarray(seeds, np.int64) % 2**32, jnp.uint32), settings,
                            jnp.asarray(prefix_codes), jnp.asarray(prefix_length), jnp.asarray(wrap))
        total = self.image_length if steps is None else steps
        done = min(int(prefix_length.min()), total)
        if done > 0:
            length = prefill_length(done, self.image_length)
            bos = np.full((batch, 1), self.config.decoder_start_token_id, np.int32)
            inputs = np.concatenate([bos, prefix_codes[:, :length - 1]], axis=1)
            state = self._prefill(self.params, state, jnp.asarray(inputs), jnp.asarray(done, jnp.int32))
        every = max(1, total if (progress is None or not progress_every) else int(progress_every))
        while True:
            done = min(total, (done // every + 1) * every)
            state = self._run(self.params, state, jnp.asarray(done, jnp.int32))
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
    "filter_logits", "guide", "guided_hidden", "image_seed", "sample", "sample_filtered", "split_keys",
    "wrap_source",
]
