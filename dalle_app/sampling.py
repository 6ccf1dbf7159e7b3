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

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalle_app.models.dallebart import ACTIVATIONS, KV, DalleBartModel

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


def image_keys(seeds: np.ndarray) -> jax.Array:
    """Raw uint32 PRNG keys (B, 2), one per image seed."""
    return jax.vmap(jax.random.PRNGKey)(jnp.asarray(np.asarray(seeds, np.uint32)))


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request with seed `seed`."""
    return (int(seed) + int(index)) % 2**31


# ----------------------------------------------------------------------------------------------
# The decoder step, specialised for sampling
#
# dalle_app.models.dallebart keeps the layers scanned (stacked on a leading axis), the layout of
# the checkpoints. Inside a scan XLA copies every layer's weight slice before using it, and the
# (B, S, H, hd) cache is transposed for every attention product: on CPU that tripled the memory
# traffic of a step (benchmarks/README.md). So the sampler unstacks the decoder's layers once at
# load, unrolls them, and keeps head-major caches (B, H, S, hd). The math is the model's
# (MODEL_NOTES.md §2.7; checked against the reference logits in tests/test_sampling.py).

LN_EPS = 1e-5


def _layer_norm(p: dict, x: jax.Array, dtype: Any) -> jax.Array:
    """LayerNorm with eps 1e-5 and one-pass float32 statistics; scale only if the checkpoint has one."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(lax.square(x32), axis=-1, keepdims=True) - lax.square(mean))
    y = (x32 - mean) * lax.rsqrt(var + LN_EPS)
    if "scale" in p:
        y = y * p["scale"]
    return (y + p["bias"]).astype(dtype)


def _precision(dtype: Any) -> lax.Precision:
    """Full float32 matmuls in float32 (no TF32 on GPU, as the model); half dtypes: the default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dense(p: dict, x: jax.Array) -> jax.Array:
    y = jnp.dot(x, p["kernel"], precision=_precision(p["kernel"].dtype))
    return y + p["bias"] if "bias" in p else y


def _feed_forward(p: dict, x: jax.Array, config: Any, dtype: Any) -> jax.Array:
    act = ACTIVATIONS[config.activation_function]
    if "GLU_0" in p:
        p = p["GLU_0"]
        h = _layer_norm(p["LayerNorm_0"], x, dtype)
        h = _layer_norm(p["LayerNorm_1"], act(_dense(p["Dense_0"], h)) * _dense(p["Dense_1"], h), dtype)
        return _dense(p["Dense_2"], h)
    p = p["FFN_0"]
    h = act(_dense(p["Dense_0"], _layer_norm(p["LayerNorm_0"], x, dtype)))
    return _dense(p["Dense_1"], _layer_norm(p["LayerNorm_1"], h, dtype))


def _attend(p: dict, h: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, dtype: Any) -> jax.Array:
    """One query per row: h (N, d) against head-major k, v (N, H, S, hd); bias (N or 1, 1, S)."""
    heads, head_dim = k.shape[1], k.shape[-1]
    q = _dense(p["q_proj"], h).reshape(h.shape[0], heads, head_dim)
    logits = jnp.einsum("nhd,nhsd->nhs", q, k, precision=_precision(dtype))
    logits = logits / jnp.sqrt(head_dim).astype(dtype)  # after QKᵀ, as dalle-mini 0.1.5
    probs = jax.nn.softmax(logits + bias).astype(dtype)
    out = jnp.einsum("nhs,nhsd->nhd", probs, v, precision=_precision(dtype))
    if "head_scale" in p:
        out = out * p["head_scale"].reshape(1, heads, 1)
    return _dense(p["out_proj"], out.reshape(h.shape[0], -1))


def _heads_first(x: jax.Array, heads: int) -> jax.Array:
    """(N, S, d) → (N, H, S, hd)."""
    n, length, d = x.shape
    return x.reshape(n, length, heads, d // heads).transpose(0, 2, 1, 3)


def prepare_decoder(params: Any, consume: bool = False) -> dict:
    """The decoder's parameters in the sampler's layout: one dict per layer (unstacked), so an
    unrolled step reads each weight in place.

    With `consume`, the stacked layers are removed from `params` and each is released as soon
    as it is split, so memory never holds the decoder twice (load-time peak: one leaf more).
    """
    decoder = params["model"]["decoder"]
    layers_tree = decoder.pop("layers") if consume else decoder["layers"]
    if "FlaxBartDecoderLayers" in layers_tree:  # scanned: split the leading layer axis
        stacked = layers_tree["FlaxBartDecoderLayers"]
        count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        flat, treedef = jax.tree_util.tree_flatten(stacked)
        del stacked, layers_tree
        per_leaf = []
        while flat:
            leaf = flat.pop(0)
            per_leaf.append([leaf[i] for i in range(count)])
            del leaf
        layers = [jax.tree_util.tree_unflatten(treedef, [parts[i] for parts in per_leaf])
                  for i in range(count)]
    else:  # already one subtree per layer: FlaxBartDecoderLayer_0, _1, ...
        layers = [layers_tree[f"FlaxBartDecoderLayer_{i}"] for i in range(len(layers_tree))]
    return {
        "embed_tokens": decoder["embed_tokens"]["embedding"],
        "embed_positions": decoder.get("embed_positions", {}).get("embedding"),
        "layernorm_embedding": decoder["layernorm_embedding"],
        "final_ln": decoder.get("final_ln"),
        "layers": layers,
        "lm_head": params["lm_head"],
    }


def cross_kv(decoder: dict, encoder_hidden: jax.Array, heads: int, dtype: Any) -> KV:
    """Every layer's cross-attention keys and values, head-major: tuples of (U, H, T, hd)."""
    x = encoder_hidden.astype(dtype)
    ks, vs = [], []
    for p in decoder["layers"]:
        ks.append(_heads_first(_dense(p["FlaxBartAttention_1"]["k_proj"], x), heads))
        vs.append(_heads_first(_dense(p["FlaxBartAttention_1"]["v_proj"], x), heads))
    return KV(tuple(ks), tuple(vs))


def empty_cache(config: Any, rows: int, dtype: Any) -> KV:
    heads = config.decoder_attention_heads
    shape = (rows, heads, config.image_length, config.d_model // heads)
    layers = range(config.decoder_layers)
    return KV(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))


def decoder_hidden(decoder: dict, config: Any, dtype: Any, tokens: jax.Array, position: jax.Array,
                   cache: KV, cross: KV, cross_bias: jax.Array) -> tuple[jax.Array, KV]:
    """One position for N rows: tokens (N,) at `position` → final hidden states (N, d), new cache."""
    x = decoder["embed_tokens"][tokens]
    if config.scale_embedding:
        x = x * jnp.asarray(np.sqrt(config.d_model), dtype)
    if decoder["embed_positions"] is not None:
        x = x + decoder["embed_positions"][position]
    x = _layer_norm(decoder["layernorm_embedding"], x, dtype)
    slots = cache.k[0].shape[2]
    self_bias = jnp.where(jnp.arange(slots) <= position, 0.0, -jnp.inf).astype(dtype)[None, None, :]
    new_k, new_v = [], []
    for i, p in enumerate(decoder["layers"]):
        heads = cache.k[i].shape[1]
        h = _layer_norm(p["LayerNorm_0"], x, dtype)
        attn = p["FlaxBartAttention_0"]
        k = _dense(attn["k_proj"], h).reshape(h.shape[0], heads, 1, -1).astype(cache.k[i].dtype)
        v = _dense(attn["v_proj"], h).reshape(h.shape[0], heads, 1, -1).astype(cache.v[i].dtype)
        layer_k = lax.dynamic_update_slice(cache.k[i], k, (0, 0, position, 0))
        layer_v = lax.dynamic_update_slice(cache.v[i], v, (0, 0, position, 0))
        new_k.append(layer_k)
        new_v.append(layer_v)
        x = x + _layer_norm(p["LayerNorm_1"], _attend(attn, h, layer_k, layer_v, self_bias, dtype), dtype)
        h = _layer_norm(p["LayerNorm_2"], x, dtype)
        cross_out = _attend(p["FlaxBartAttention_1"], h, cross.k[i], cross.v[i], cross_bias, dtype)
        x = x + _layer_norm(p["LayerNorm_3"], cross_out, dtype)
        x = x + _feed_forward(p, x, config, dtype)
    if decoder["final_ln"] is not None:
        x = _layer_norm(decoder["final_ln"], x, dtype)
    return x, KV(tuple(new_k), tuple(new_v))


def guided_logits(decoder: dict, hidden: jax.Array, cond_scale: jax.Array) -> jax.Array:
    """Super-conditioned logits (B, V+1) float32 from interleaved cond/uncond hidden states (2B, d).

    lm_head is linear without bias, so uncond + s·(cond − uncond) is taken on the hidden states
    and only B rows go through lm_head instead of 2B.
    """
    pairs = hidden.astype(jnp.float32).reshape(-1, 2, hidden.shape[-1])
    mixed = guide(pairs[:, 0], pairs[:, 1], cond_scale).astype(hidden.dtype)
    return _dense(decoder["lm_head"], mixed).astype(jnp.float32)


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
    cross_bias: jax.Array  # (2B, 1, text_length) 0 / -inf from the text masks
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

    Holds the parameters in its own layout (`params`: the encoder as loaded, the decoder
    unstacked). jax.jit caches one executable per input shape, so each batch-size bucket (and
    each bucket of distinct texts for `encode_texts`) compiles once; the sampling settings are
    traced. With a mesh, image rows are split over its devices (data parallel) and the weights
    replicated; the results are the same as on one device.
    """

    def __init__(self, model: DalleBartModel, mesh: Mesh | None = None, consume: bool = False) -> None:
        """consume=True takes the decoder weights out of `model.params` (no second copy); the
        model's own decode methods then no longer work — use this sampler."""
        self.config = model.config
        self.dtype = model.dtype
        self.mesh = mesh
        self.image_length = model.config.image_length
        self.num_codes = model.config.image_vocab_size
        params = {"encoder": {"model": {"encoder": model.params["model"]["encoder"]}},
                  "decoder": prepare_decoder(model.params, consume)}
        self.model = dataclasses.replace(model, params=None) if consume else model
        if mesh is not None:
            params = jax.device_put(params, NamedSharding(mesh, P()))
        self.params = params
        self._encode = jax.jit(self._encode_texts)
        self._start = jax.jit(self._start_loop)
        self._run = jax.jit(self._run_loop, donate_argnums=(1,))

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    # ---- programs -------------------------------------------------------------------------

    def _encode_texts(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> KV:
        hidden = self.model.encode(params["encoder"], input_ids, attention_mask)
        return cross_kv(params["decoder"], hidden, self.config.decoder_attention_heads, self.dtype)

    def _shard(self, x: jax.Array, axis: int = 0) -> jax.Array:
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
        gather = lambda xs: tuple(self._shard(jnp.take(x, text_rows, axis=0)) for x in xs)
        cache = empty_cache(self.config, 2 * batch, self.dtype)
        mask = jnp.take(mask_texts, text_rows, axis=0)
        bos = jnp.full((batch,), self.config.decoder_start_token_id, jnp.int32)
        return LoopState(
            cache=KV(*(tuple(self._shard(x) for x in xs) for xs in cache)),
            cross=KV(gather(cross_texts.k), gather(cross_texts.v)),
            cross_bias=self._shard(jnp.where(mask > 0, 0.0, -jnp.inf).astype(self.dtype)[:, None, :]),
            tokens=self._shard(bos),
            codes=self._shard(jnp.zeros((batch, self.image_length), jnp.int32)),
            keys=self._shard(jax.vmap(jax.random.PRNGKey)(seeds.astype(jnp.uint32))),
            position=jnp.zeros((), jnp.int32),
            settings=Settings(*(self._shard(x) for x in settings)),
        )

    def _run_loop(self, params: Any, state: LoopState, stop: jax.Array) -> LoopState:
        """Decode positions state.position .. stop-1 (traced bounds: one program for any chunk)."""
        s, decoder = state.settings, params["decoder"]

        def step(position: jax.Array, carry: tuple) -> tuple:
            cache, tokens, codes, keys = carry
            hidden, cache = decoder_hidden(decoder, self.config, self.dtype, jnp.repeat(tokens, 2),
                                           position, cache, state.cross, state.cross_bias)
            logits = guided_logits(decoder, hidden, s.cond_scale)
            draw_keys, keys = split_keys(keys)
            tokens = sample_filtered(draw_keys, logits, s.temperature, s.top_k, s.top_p, self.num_codes)
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

    def generate(self, cross_texts: KV, mask_texts: np.ndarray,
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
    "filter_logits", "guide", "image_keys", "image_seed", "sample", "sample_filtered", "split_keys",
]
