"""DalleBart (DALL·E Mini / Mega): the text encoder and image-token decoder, in Flax linen.

The math is that of `dalle-mini` 0.1.5 for the published checkpoints: NormFormer layer norms
(eps 1e-5, float32 one-pass statistics, bias-only pre-norms), GLU feed-forward, attention logits
divided by sqrt(head_dim) *after* QKᵀ, additive -inf masks, learned positions without offset, no
embedding scaling, and an untied lm_head with image_vocab_size + 1 outputs.

Parameter names are exactly those of the checkpoints. The module keeps one parameter set per
layer (`.../layers/FlaxBartEncoderLayer_{i}/...`, the unscanned layout) and loops over layers in
Python: under jit each layer's weights are then read in place, once per step (scanning over
stacked weights makes XLA copy every layer's slice first: a mini-sized decode step on CPU was
2.3x slower that way). The published mini and mega store layers *scanned*
(`FlaxBartEncoderLayers/...` with a leading layer axis); `load_dallebart` splits them into
per-layer views at load (`unstack_layers`), `stack_layers` converts back (to save in the
published layout), and `scanned_layer_shapes` gives that naming of a parameter tree.

Engine API: the teacher-forced forward pass (training, parity checks) and the KV-cached decode
that dalle_app.sampling runs. All are pure and jit-able methods of `DalleBartModel` (what
`load_dallebart` returns), each a `module.apply` of the linen method of the same name on
`DalleBart`:

    encode(params, input_ids (B,T) int32, attention_mask (B,T) int32) -> (B, T, d)
    decode(params, decoder_input_ids (B,L) int32, encoder_hidden (B,T,d), encoder_mask (B,T))
        -> logits (B, L, image_vocab_size + 1) float32          # teacher-forced, causal
    cross_kv(params, encoder_hidden (B,T,d)) -> KV
        # every decoder layer's cross-attention keys/values: computed once per text, then
        # gathered for each image row
    decode_hidden(params, tokens (B,L) int32, position int32 scalar, cache: KV, cross: KV,
                  encoder_mask (B,T)) -> (hidden (B, L, d), cache: KV)
        # L consecutive positions position..position+L-1: each layer writes their keys/values
        # into the cache, then attends over slots <= its position (fills the cache with a
        # known prefix in one pass). Tokens (B,) run one position and give hidden (B, d): a
        # sampling step. Feed BOS at position 0, then the code of position t at position
        # t + 1. Jit with the cache donated to update it in place.
    logits(params, hidden (..., d)) -> (..., image_vocab_size + 1) float32   # lm_head
    decode_step(params, tokens (B,), position, cache, cross, encoder_mask)
        -> (logits (B, image_vocab_size + 1) float32, cache)     # logits(decode_hidden(...))
    init_cache(batch) -> KV of zeros, image_length slots

`KV` holds one array per decoder layer for keys and one for values, each head-major
(B, heads, length, head_dim): separate buffers that a step updates in place, laid out so that
the per-head products read them without a transpose. `decode_hidden` and `logits` are separate
so that the sampler can mix conditional and unconditional hidden states (lm_head is linear)
and run the lm_head on half the rows.

Everything is computed in the dtype the parameters were cast to at load (float32, bfloat16 or
float16); logits are returned in float32. On CPU prefer float32: XLA:CPU runs half-precision
matmuls several times slower than float32 ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dalle_app.models import weights
from dalle_app.models.dallebart_config import ACTIVATION_NAMES, DalleBartConfig, UnsupportedConfigError
from dalle_app.models.weights import CheckpointError

__all__ = [
    "DalleBart", "DalleBartConfig", "DalleBartModel", "KV", "UnsupportedConfigError",
    "CheckpointError", "init_cache", "load_dallebart", "scanned_layer_shapes", "stack_layers",
    "unstack_layers",
]

WEIGHTS_NAME = "flax_model.msgpack"
LN_EPS = 1e-5
ENCODER_LAYER = "FlaxBartEncoderLayer"  # checkpoint names: .../layers/FlaxBartEncoderLayer_{i}/...
DECODER_LAYER = "FlaxBartDecoderLayer"

# The functions behind config.json's `activation_function`, in the order of ACTIVATION_NAMES.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = dict(zip(ACTIVATION_NAMES, (
    partial(nn.gelu, approximate=False),  # "gelu": exact erf GELU, as transformers' Flax "gelu"
    partial(nn.gelu, approximate=True),   # "gelu_new": the tanh approximation
    nn.relu, nn.silu, nn.swish, nn.sigmoid, jnp.tanh,
), strict=True))


class KV(NamedTuple):
    """Keys and values of every decoder layer: one array per layer, (B, heads, length, head_dim)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


# ----------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.Module):
    """flax 0.6 LayerNorm with eps 1e-5: one-pass float32 statistics, optional scale.

    Written out rather than taken from flax so that the variance E[x²]−E[x]² (clamped at 0) and
    the float32 normalization stay fixed whatever flax version is installed.
    """

    use_scale: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.maximum(0.0, jnp.mean(lax.square(x32), axis=-1, keepdims=True) - lax.square(mean))
        mul = lax.rsqrt(var + LN_EPS)
        if self.use_scale:  # folded into the multiplier first, in flax's order of rounding
            mul = mul * self.param("scale", nn.initializers.ones, (features,), self.dtype)
        y = (x32 - mean) * mul + self.param("bias", nn.initializers.zeros, (features,), self.dtype)
        return y.astype(self.dtype)


def _norm(config: DalleBartConfig, dtype: Any, scaled: bool, name: str | None = None) -> LayerNorm:
    """Norms that feed a dense layer have no scale unless force_ln_scale (NormFormer)."""
    return LayerNorm(use_scale=scaled or config.force_ln_scale, dtype=dtype, name=name)


def _precision(dtype: Any) -> lax.Precision:
    """Full float32 matmuls when computing in float32 (GPUs would otherwise use TF32 and drift
    ~1e-3 from the reference); half-precision dtypes keep the backend default."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dense(config: DalleBartConfig, features: int, dtype: Any, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=config.use_bias, dtype=dtype, param_dtype=dtype,
                    precision=_precision(dtype), name=name)


def attention_bias(mask: jax.Array, dtype: Any) -> jax.Array:
    """Boolean/int mask → additive bias: 0 where attended, -inf elsewhere."""
    return jnp.where(mask > 0, 0.0, -jnp.inf).astype(dtype)


class FlaxBartAttention(nn.Module):
    """Multi-head attention; `kv` and `__call__` are split so that keys and values can come
    from a cache or be computed once per text (cross-attention). Keys and values are
    head-major (B, H, S, head_dim)."""

    config: DalleBartConfig
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        d = self.config.d_model
        self.q_proj = _dense(self.config, d, self.dtype)
        self.k_proj = _dense(self.config, d, self.dtype)
        self.v_proj = _dense(self.config, d, self.dtype)
        self.out_proj = _dense(self.config, d, self.dtype)
        if self.config.use_head_scale:  # NormFormer per-head output gain
            self.head_scale = self.param("head_scale", nn.initializers.ones, (1, 1, self.num_heads, 1), self.dtype)

    def _heads_first(self, x: jax.Array) -> jax.Array:
        """(B, S, d) → (B, H, S, head_dim); one position (B, d) → (B, H, 1, head_dim)."""
        if x.ndim == 2:
            return x.reshape(x.shape[0], self.num_heads, 1, -1)
        batch, length, d = x.shape
        return x.reshape(batch, length, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, S, d) or one position (B, d) → keys and values, each (B, H, S, head_dim)."""
        return self._heads_first(self.k_proj(x)), self._heads_first(self.v_proj(x))

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
        """Queries from x (B, L, d) attend over k, v (B, H, S, hd); bias broadcasts to (B, H, L, S).

        One position may come as x (B, d) (bias then broadcasts to (B, H, S)): without a length
        axis of size 1, XLA adds no layout copies around it, which a sampling step would pay
        for in every layer.
        """
        q = self.q_proj(x)
        if x.ndim == 2:
            q = q.reshape(q.shape[0], self.num_heads, -1)
            scores, mix = "bhd,bhkd->bhk", "bhk,bhkd->bhd"
        else:
            q = self._heads_first(q)
            scores, mix = "bhqd,bhkd->bhqk", "bhqk,bhkd->bqhd"
        logits = jnp.einsum(scores, q, k, precision=_precision(self.dtype))
        logits = logits / jnp.sqrt(q.shape[-1]).astype(self.dtype)  # after QKᵀ, as 0.1.5
        probs = jax.nn.softmax(logits + bias).astype(self.dtype)
        out = jnp.einsum(mix, probs, v, precision=_precision(self.dtype))  # (..., H, hd)
        if self.config.use_head_scale:
            out = out * self.head_scale.reshape(self.num_heads, 1)
        return self.out_proj(out.reshape(x.shape))


class GLU(nn.Module):
    """NormFormer GLU: LN → gelu(x W0) ⊙ (x W1) → LN over ffn_dim → W2."""

    config: DalleBartConfig
    ffn_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, act = self.config, ACTIVATIONS[self.config.activation_function]
        x = _norm(cfg, self.dtype, False, "LayerNorm_0")(x)
        w = act(_dense(cfg, self.ffn_dim, self.dtype, "Dense_0")(x))
        v = _dense(cfg, self.ffn_dim, self.dtype, "Dense_1")(x)
        x = _norm(cfg, self.dtype, False, "LayerNorm_1")(w * v)
        return _dense(cfg, cfg.d_model, self.dtype, "Dense_2")(x)


class FFN(nn.Module):
    """Plain NormFormer feed-forward (use_glu=false): LN → act(x W0) → LN → W1."""

    config: DalleBartConfig
    ffn_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, act = self.config, ACTIVATIONS[self.config.activation_function]
        x = _norm(cfg, self.dtype, False, "LayerNorm_0")(x)
        x = act(_dense(cfg, self.ffn_dim, self.dtype, "Dense_0")(x))
        x = _norm(cfg, self.dtype, False, "LayerNorm_1")(x)
        return _dense(cfg, cfg.d_model, self.dtype, "Dense_1")(x)


# ----------------------------------------------------------------------------------------------
# Layers. The stacks loop over layers in Python (unrolled under jit) rather than nn.scan: each
# layer's weights are then separate buffers, and XLA reads them in place (see module docstring).


class FlaxBartEncoderLayer(nn.Module):
    config: DalleBartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.LayerNorm_0 = _norm(cfg, self.dtype, False)
        self.FlaxBartAttention_0 = FlaxBartAttention(cfg, cfg.encoder_attention_heads, self.dtype)
        self.LayerNorm_1 = _norm(cfg, self.dtype, True)
        if cfg.use_glu:
            self.GLU_0 = GLU(cfg, cfg.encoder_ffn_dim, self.dtype)
        else:
            self.FFN_0 = FFN(cfg, cfg.encoder_ffn_dim, self.dtype)

    def _feed_forward(self, x: jax.Array) -> jax.Array:
        return self.GLU_0(x) if self.config.use_glu else self.FFN_0(x)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        h = self.LayerNorm_0(x)
        k, v = self.FlaxBartAttention_0.kv(h)
        x = x + self.LayerNorm_1(self.FlaxBartAttention_0(h, k, v, bias))
        return x + self._feed_forward(x)


class FlaxBartDecoderLayer(nn.Module):
    config: DalleBartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        heads = cfg.decoder_attention_heads
        self.LayerNorm_0 = _norm(cfg, self.dtype, False)
        self.FlaxBartAttention_0 = FlaxBartAttention(cfg, heads, self.dtype)  # causal self
        self.LayerNorm_1 = _norm(cfg, self.dtype, True)
        self.LayerNorm_2 = _norm(cfg, self.dtype, False)
        self.FlaxBartAttention_1 = FlaxBartAttention(cfg, heads, self.dtype)  # cross
        self.LayerNorm_3 = _norm(cfg, self.dtype, True)
        if cfg.use_glu:
            self.GLU_0 = GLU(cfg, cfg.decoder_ffn_dim, self.dtype)
        else:
            self.FFN_0 = FFN(cfg, cfg.decoder_ffn_dim, self.dtype)

    def _feed_forward(self, x: jax.Array) -> jax.Array:
        return self.GLU_0(x) if self.config.use_glu else self.FFN_0(x)

    def cross_kv(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.FlaxBartAttention_1.kv(encoder_hidden)

    def __call__(self, x: jax.Array, position: jax.Array | int, self_k: jax.Array, self_v: jax.Array,
                 self_bias: jax.Array, cross_k: jax.Array, cross_v: jax.Array,
                 cross_bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, L, d) at positions position.., or (B, d) at one position; self_k/v: this
        layer's cache (B, H, S, hd).

        Writes the keys/values of these L positions into the cache, attends, and returns
        (x, self_k, self_v) with the updated cache.
        """
        h = self.LayerNorm_0(x)
        k, v = self.FlaxBartAttention_0.kv(h)
        self_k = lax.dynamic_update_slice(self_k, k.astype(self_k.dtype), (0, 0, position, 0))
        self_v = lax.dynamic_update_slice(self_v, v.astype(self_v.dtype), (0, 0, position, 0))
        x = x + self.LayerNorm_1(self.FlaxBartAttention_0(h, self_k, self_v, self_bias))
        h = self.LayerNorm_2(x)
        x = x + self.LayerNorm_3(self.FlaxBartAttention_1(h, cross_k, cross_v, cross_bias))
        return x + self._feed_forward(x), self_k, self_v


class _LayerStack(nn.Module):
    """`n` layers named `{name}_{i}` (ENCODER_LAYER or DECODER_LAYER), as in unscanned checkpoints."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    def _setup_layers(self, layer: type[nn.Module], name: str, n: int) -> None:
        self.names = [f"{name}_{i}" for i in range(n)]
        for layer_name in self.names:
            setattr(self, layer_name, layer(self.config, self.dtype))

    def _layers(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.names]


class EncoderLayers(_LayerStack):
    def setup(self) -> None:
        self._setup_layers(FlaxBartEncoderLayer, ENCODER_LAYER, self.config.encoder_layers)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        for layer in self._layers():
            x = layer(x, bias)
        return x


class DecoderLayers(_LayerStack):
    def setup(self) -> None:
        self._setup_layers(FlaxBartDecoderLayer, DECODER_LAYER, self.config.decoder_layers)

    def cross_kv(self, encoder_hidden: jax.Array) -> KV:
        ks, vs = zip(*(layer.cross_kv(encoder_hidden) for layer in self._layers()))
        return KV(tuple(ks), tuple(vs))

    def __call__(self, x: jax.Array, position: jax.Array | int, cache: KV, self_bias: jax.Array,
                 cross: KV, cross_bias: jax.Array) -> tuple[jax.Array, KV]:
        """Each layer writes its keys/values of positions position.. into its cache, then attends."""
        ks, vs = [], []
        for layer, k, v, cross_k, cross_v in zip(self._layers(), cache.k, cache.v, cross.k, cross.v):
            x, k, v = layer(x, position, k, v, self_bias, cross_k, cross_v, cross_bias)
            ks.append(k)
            vs.append(v)
        return x, KV(tuple(ks), tuple(vs))


# ----------------------------------------------------------------------------------------------
# Encoder, decoder, full model


class _Stack(nn.Module):
    """What encoder and decoder share: token + learned absolute position embeddings,
    layernorm_embedding (scale and bias), and an optional bias-only final_ln."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    def _setup_embeddings(self, vocab_size: int, max_positions: int, final_ln: bool) -> None:
        embed = partial(nn.Embed, features=self.config.d_model, dtype=self.dtype, param_dtype=self.dtype)
        self.embed_tokens = embed(vocab_size)
        if self.config.use_absolute_position_embeddings:
            self.embed_positions = embed(max_positions)
        self.layernorm_embedding = LayerNorm(use_scale=True, dtype=self.dtype)
        self.final_ln = _norm(self.config, self.dtype, False) if final_ln else None

    def _embed(self, ids: jax.Array, first_position: jax.Array | int) -> jax.Array:
        """ids (B, L) at positions first_position.., or (B,) at first_position → (B, [L,] d)."""
        x = self.embed_tokens(ids)
        if self.config.scale_embedding:
            x = x * jnp.asarray(math.sqrt(self.config.d_model), self.dtype)
        if self.config.use_absolute_position_embeddings:
            positions = first_position + jnp.arange(ids.shape[1]) if ids.ndim == 2 else first_position
            x = x + self.embed_positions(positions)
        return self.layernorm_embedding(x)

    def _final(self, x: jax.Array) -> jax.Array:
        return x if self.final_ln is None else self.final_ln(x)


class FlaxBartEncoder(_Stack):
    def setup(self) -> None:
        cfg = self.config
        self._setup_embeddings(cfg.encoder_vocab_size, cfg.max_text_length, cfg.use_final_ln_encoder)
        self.layers = EncoderLayers(cfg, self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self._embed(input_ids, 0)
        x = self.layers(x, attention_bias(attention_mask[:, None, None, :], self.dtype))
        return self._final(x)


class FlaxBartDecoder(_Stack):
    def setup(self) -> None:
        cfg = self.config
        self._setup_embeddings(cfg.num_image_tokens, cfg.image_length, cfg.use_final_ln_decoder)
        self.layers = DecoderLayers(cfg, self.dtype)

    def cross_kv(self, encoder_hidden: jax.Array) -> KV:
        return self.layers.cross_kv(encoder_hidden)

    def __call__(self, tokens: jax.Array, position: jax.Array | int, cache: KV, cross: KV,
                 encoder_mask: jax.Array) -> tuple[jax.Array, KV]:
        """Run tokens (B, L) at positions position..position+L-1, or (B,) at one position,
        against a cache of S slots; returns the final hidden states (B, [L,] d) and the cache."""
        single = tokens.ndim == 1
        length, slots = 1 if single else tokens.shape[1], cache.k[0].shape[2]
        x = self._embed(tokens, position)
        query_pos = position + jnp.arange(length)[:, None]
        self_bias = attention_bias(jnp.arange(slots)[None, :] <= query_pos, self.dtype)  # (L, S)
        cross_bias = attention_bias(encoder_mask[:, None, :], self.dtype)  # (B, 1, T)
        if not single:  # with the length axis: (1, 1, L, S) and (B, 1, 1, T)
            self_bias, cross_bias = self_bias[None, None], cross_bias[:, :, None]
        x, cache = self.layers(x, position, cache, self_bias, cross, cross_bias)
        return self._final(x), cache


class FlaxBartModule(nn.Module):
    config: DalleBartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.encoder = FlaxBartEncoder(self.config, self.dtype)
        self.decoder = FlaxBartDecoder(self.config, self.dtype)


class DalleBart(nn.Module):
    """The full model; its linen methods are the engine API (see the module docstring)."""

    config: DalleBartConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.model = FlaxBartModule(self.config, self.dtype)
        self.lm_head = nn.Dense(self.config.num_image_tokens, use_bias=False, dtype=self.dtype,
                                precision=_precision(self.dtype),
                                param_dtype=self.dtype)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return self.model.encoder(input_ids, attention_mask)

    def cross_kv(self, encoder_hidden: jax.Array) -> KV:
        return self.model.decoder.cross_kv(encoder_hidden.astype(self.dtype))

    def decode_hidden(self, tokens: jax.Array, position: jax.Array | int, cache: KV, cross: KV,
                      encoder_mask: jax.Array) -> tuple[jax.Array, KV]:
        """Final hidden states (B, L, d) of tokens (B, L) at L consecutive positions (or (B, d)
        of tokens (B,) at one position), and the updated cache."""
        return self.model.decoder(tokens, position, cache, cross, encoder_mask)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """lm_head: hidden states (..., d) → logits (..., V+1) float32."""
        return self.lm_head(hidden.astype(self.dtype)).astype(jnp.float32)

    def decode_step(self, tokens: jax.Array, position: jax.Array | int, cache: KV, cross: KV,
                    encoder_mask: jax.Array) -> tuple[jax.Array, KV]:
        """One position: tokens (B,) → logits (B, V+1) float32, and the updated cache."""
        hidden, cache = self.decode_hidden(tokens, position, cache, cross, encoder_mask)
        return self.logits(hidden), cache

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
               encoder_mask: jax.Array) -> jax.Array:
        """Teacher-forced causal logits (B, L, V+1) float32."""
        batch, length = decoder_input_ids.shape
        cache = init_cache(self.config, batch, self.dtype, length)
        hidden, _ = self.decode_hidden(decoder_input_ids, 0, cache, self.cross_kv(encoder_hidden), encoder_mask)
        return self.logits(hidden)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array) -> jax.Array:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)


def init_cache(config: DalleBartConfig, batch: int, dtype: Any = jnp.float32, length: int | None = None) -> KV:
    """Empty self-attention cache: per decoder layer, k and v zeros (batch, H, length or image_length, hd)."""
    heads = config.decoder_attention_heads
    shape = (batch, heads, length or config.image_length, config.d_model // heads)
    layers = range(config.decoder_layers)
    return KV(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))


# ----------------------------------------------------------------------------------------------
# Parameter layouts


_LAYER_NAMES = f"{ENCODER_LAYER}|{DECODER_LAYER}"
_LAYER = re.compile(rf"/({_LAYER_NAMES})_(\d+)/")  # unscanned: one name per layer
_SCANNED = re.compile(rf"/({_LAYER_NAMES})s/")  # scanned: leading layer axis


def abstract_params(config: DalleBartConfig, dtype: Any = jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the module's (unscanned) parameters, without allocating them."""
    module = DalleBart(config, dtype)
    text = jnp.ones((1, config.max_text_length), jnp.int32)
    image = jnp.ones((1, config.image_length), jnp.int32)
    tree = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), text, text, image))
    return weights.flatten(tree["params"])


def scanned_layer_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Unscanned {path: shape} → the scanned naming of the published checkpoints
    (`.../FlaxBartEncoderLayers/...` with a leading layer axis)."""
    layers: dict[str, int] = {}
    out: dict[str, tuple[int, ...]] = {}
    for path, shape in shapes.items():
        match = _LAYER.search(path)
        if match is None:
            out[path] = tuple(shape)
            continue
        scanned = _LAYER.sub(r"/\1s/", path, count=1)
        layers[scanned] = layers.get(scanned, 0) + 1
        out[scanned] = tuple(shape)
    return {path: (layers[path],) + shape if path in layers else shape for path, shape in out.items()}


def is_scanned(flat: dict[str, Any]) -> bool:
    return any(_SCANNED.search(path) for path in flat)


def unstack_layers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scanned checkpoint → per-layer arrays, as views (no copy) of the stacked ones.

    `flat` is consumed. A stacked array is freed once its last layer view has been moved to the
    device, so loading holds at most one stacked parameter twice, never all weights twice.
    """
    out: dict[str, np.ndarray] = {}
    for path in list(flat):
        leaf = flat.pop(path)
        if _SCANNED.search(path) is None:
            out[path] = leaf
            continue
        for i, layer in enumerate(leaf):
            out[_SCANNED.sub(rf"/\1_{i}/", path, count=1)] = layer
    return out


def stack_layers(flat: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-layer parameters → the scanned layout of the published checkpoints (for saving),
    the inverse of `unstack_layers`. Makes host copies; use it on host or small trees."""
    groups: dict[str, dict[int, Any]] = {}
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat.items():
        match = _LAYER.search(path)
        if match is None:
            out[path] = np.asarray(leaf)
        else:
            groups.setdefault(_LAYER.sub(r"/\1s/", path, count=1), {})[int(match.group(2))] = leaf
    for path, layers in groups.items():
        out[path] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
    return out


# ----------------------------------------------------------------------------------------------
# Loading


def _as_dtype(dtype: Any) -> jnp.dtype:
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"compute dtype must be float32, bfloat16 or float16, not {dt}")
    return dt


@dataclasses.dataclass(frozen=True)
class DalleBartModel:
    """A loaded DalleBart: config, linen module and parameters (in the compute dtype).

    The methods are the engine API: pure functions of (params, inputs), safe to jit.
    """

    config: DalleBartConfig
    module: DalleBart
    params: Any

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.module.dtype)

    def encode(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, input_ids, attention_mask, method="encode")

    def decode(self, params: Any, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
               encoder_mask: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, decoder_input_ids, encoder_hidden, encoder_mask,
                                 method="decode")

    def cross_kv(self, params: Any, encoder_hidden: jax.Array) -> KV:
        return self.module.apply({"params": params}, encoder_hidden, method="cross_kv")

    def init_cache(self, batch: int) -> KV:
        return init_cache(self.config, batch, self.dtype)

    def decode_hidden(self, params: Any, tokens: jax.Array, position: jax.Array | int, cache: KV,
                      cross: KV, encoder_mask: jax.Array) -> tuple[jax.Array, KV]:
        return self.module.apply({"params": params}, tokens, position, cache, cross, encoder_mask,
                                 method="decode_hidden")

    def logits(self, params: Any, hidden: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, hidden, method="logits")

    def decode_step(self, params: Any, tokens: jax.Array, position: jax.Array | int, cache: KV, cross: KV,
                    encoder_mask: jax.Array) -> tuple[jax.Array, KV]:
        return self.module.apply({"params": params}, tokens, position, cache, cross, encoder_mask,
                                 method="decode_step")


def load_dallebart(folder: str | os.PathLike, dtype: Any = jnp.float32) -> DalleBartModel:
    """Load config.json and flax_model.msgpack (scanned or unscanned; fp32, fp16 or bf16 weights),
    cast once to `dtype`, the compute dtype.

    Peak memory stays near one copy of the weights in each dtype: leaves are converted and freed
    one at a time.
    """
    folder = Path(folder)
    compute = _as_dtype(dtype)
    config = DalleBartConfig.from_pretrained(folder)
    path = folder / WEIGHTS_NAME
    expected = {k: v.shape for k, v in abstract_params(config, compute).items()}
    flat = weights.flatten(weights.read_msgpack(path))
    if is_scanned(flat):
        weights.check_shapes(flat, scanned_layer_shapes(expected), str(path))
        flat = unstack_layers(flat)
    weights.check_shapes(flat, expected, str(path))
    params = weights.to_device_tree(flat, compute)
    return DalleBartModel(config, DalleBart(config, compute), params)
