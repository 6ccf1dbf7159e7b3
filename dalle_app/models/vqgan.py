"""The VQGAN (taming-transformers f16 family) in Flax linen, loadable from the published
`dalle-mini/vqgan_imagenet_f16_16384` checkpoint.

Parameter paths match that checkpoint exactly (`encoder/down_i/block_j/...`,
`decoder/up_i/attn_j/...`, `quantize/embedding/embedding`, ...), so its `flax_model.msgpack`
loads as-is. The math follows taming-transformers (the same as vqgan-jax after its attention
fix): GroupNorm(32, eps 1e-6), swish, single-head attention applied right after its res block,
nearest x2 upsampling then a 3x3 conv, bottom/right zero padding before the stride-2 conv.

Seamless decoding (`VQGAN.decode(codes, seamless=True)`) reads the code grid as a torus, for
pictures that tile. The decoder draws a faint frame where its zero padding meets the picture's
edges, so the grid is also decoded rolled by half its side (across one axis, the other, both):
there the edges sit in the middle, with their wrap-around neighbours beside them. Near each edge
the picture is taken from the decode that has that edge inside, blended by weights that are 1 at
the edge and 0 from a quarter of the side inwards (`wrap_weights`), so the middle is the plain
decode unchanged. Four decodes instead of one; the weights are the published ones. Circular
padding of the convolutions, the usual way, ruins the embedded model's pictures: its group norms
and mid attention take the zero-padded edges into account, and the colours change everywhere.

Pixel range: the network itself has no range built in. DALL·E Mini encodes images as floats in
[0, 1] (no `2x - 1`), so its codes decode to roughly [0, 1]; `to_uint8` clips to [0, 1] and
truncates `x * 255`, as DALL·E Mini does. Everything is NHWC.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_app.models.weights import (
    CheckpointError,
    Tree,
    check_shapes,
    expected_shapes,
    flatten,
    read_msgpack,
    to_device_tree,
    unflatten,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "flax_model.msgpack"
NORM_GROUPS = 32
NORM_EPS = 1e-6
# Full float32 convolutions and matmuls on every backend: with GPUs' default (TF32) precision the
# decoded pixels drift by ~4e-3 from the float32 reference (measured on an H100); on CPU it changes nothing.
PRECISION = jax.lax.Precision.HIGHEST


class UnsupportedVQGANConfig(ValueError):
    """config.json asks for a VQGAN variant this module does not implement."""


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Sizes of the VQGAN, with the names and defaults of vqgan-jax's `VQGANConfig`."""

    ch: int = 128
    out_ch: int = 3
    in_channels: int = 3
    num_res_blocks: int = 2
    resolution: int = 256
    z_channels: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    attn_resolutions: tuple[int, ...] = (16,)
    n_embed: int = 1024
    embed_dim: int = 256
    dropout: float = 0.0
    double_z: bool = False
    resamp_with_conv: bool = True
    give_pre_end: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.double_z:
            raise UnsupportedVQGANConfig(
                "double_z=true is not supported: a vector-quantized model takes z_channels from the "
                "encoder (double_z is for the KL autoencoder). Set double_z to false."
            )
        if self.give_pre_end:
            raise UnsupportedVQGANConfig(
                "give_pre_end=true is not supported: the decoder must end with norm_out and conv_out "
                "to produce images. Set give_pre_end to false."
            )
        for c in {self.ch * m for m in self.ch_mult}:
            if c % NORM_GROUPS:
                raise UnsupportedVQGANConfig(
                    f"ch * ch_mult gives {c} channels, not a multiple of the {NORM_GROUPS} GroupNorm "
                    "groups: choose ch and ch_mult so every level has a multiple of 32 channels."
                )
        if self.resolution % 2 ** (self.num_resolutions - 1):
            raise UnsupportedVQGANConfig(
                f"resolution {self.resolution} is not divisible by the downsampling factor "
                f"{2 ** (self.num_resolutions - 1)} implied by ch_mult {list(self.ch_mult)}."
            )

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsampling(self) -> int:
        """Pixels per side of the image patch one code stands for (the 16 of f16)."""
        return 2 ** (self.num_resolutions - 1)

    @property
    def latent_size(self) -> int:
        """Side of the square code grid (16 for the published f16 model at 256x256)."""
        return self.resolution // self.downsampling

    @property
    def num_codes(self) -> int:
        """Codes per image (h * w)."""
        return self.latent_size**2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        """Build from a config.json dict; keys that are not sizes (transformers' bookkeeping) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if "num_resolutions" in d and int(d["num_resolutions"]) != cfg.num_resolutions:
            raise UnsupportedVQGANConfig(
                f"num_resolutions={d['num_resolutions']} disagrees with len(ch_mult)={cfg.num_resolutions}; "
                "fix config.json so they match."
            )
        return cfg

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "VQGANConfig":
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"VQGAN config not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"could not parse {path}: {e}") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The config.json content, in vqgan-jax's key names (sorted keys when written)."""
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        d["num_resolutions"] = self.num_resolutions
        return d


# ---------------------------------------------------------------------------------------------
# Building blocks


def _conv(features: int, kernel: int, dtype: Any, name: str | None = None, stride: int = 1,
          padding: Any = None) -> nn.Conv:
    pad = padding if padding is not None else (((1, 1), (1, 1)) if kernel == 3 else "VALID")
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   precision=PRECISION, name=name)


class GroupNorm(nn.Module):
    """GroupNorm(32 contiguous channel groups, eps 1e-6) with `scale`/`bias`, optionally followed by swish.

    Same math as flax's `nn.GroupNorm` (biased variance as E[x²] − E[x]²), arranged for speed on
    CPU: per-channel sums over H·W (a reduction along the contiguous channel axis), group
    statistics on the tiny (B, C) sums, then one fused pass x·a + b (+ swish) with per-channel
    a and b. flax's version reduces over a (B, H, W, G, C/G) view and normalises in more passes.
    """

    swish: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32).reshape(b, -1, c)
        count = xf.shape[1] * (c // NORM_GROUPS)
        group_sum = jnp.sum(xf, axis=1).reshape(b, NORM_GROUPS, -1).sum(-1)
        group_sq = jnp.sum(jnp.square(xf), axis=1).reshape(b, NORM_GROUPS, -1).sum(-1)
        mean = group_sum / count
        inv = jax.lax.rsqrt(jnp.maximum(group_sq / count - mean**2, 0.0) + NORM_EPS)
        mul = jnp.repeat(inv, c // NORM_GROUPS, axis=1) * scale  # (B, C)
        add = bias - jnp.repeat(mean, c // NORM_GROUPS, axis=1) * mul
        y = x.astype(jnp.float32) * mul[:, None, None, :] + add[:, None, None, :]
        return (nn.swish(y) if self.swish else y).astype(self.dtype)


def _norm(dtype: Any, name: str, swish: bool = False) -> GroupNorm:
    return GroupNorm(swish, dtype, name=name)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus x (through a 1x1
    `nin_shortcut` when the channel count changes)."""

    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(_norm(self.dtype, "norm1", swish=True)(x))
        h = _norm(self.dtype, "norm2", swish=True)(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (row-major), scale C^-0.5, residual."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = _norm(self.dtype, "norm")(x)
        q, k, v = (_conv(c, 1, self.dtype, n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
        scores = jnp.einsum("bqc,bkc->bqk", q, k, precision=PRECISION) * (int(c) ** -0.5)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=PRECISION).reshape(b, hh, ww, c)
        return x + _conv(c, 1, self.dtype, "proj_out")(out)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2: out[2i+a, 2j+b] = in[i, j]."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _fold_taps(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Fold a 3-tap kernel axis into the 2 taps each output parity reads after nearest x2 upsampling.

    Rows 2i-1, 2i, 2i+1 of the upsampled image are input rows i-1, i, i (even output rows) and
    i, i, i+1 (odd ones), so even rows use taps (w0, w1+w2) on input rows (i-1, i) and odd rows
    use (w0+w1, w2) on input rows (i, i+1).
    """
    t0, t1, t2 = (jax.lax.index_in_dim(w, k, axis) for k in range(3))
    return jnp.concatenate([t0, t1 + t2], axis), jnp.concatenate([t0 + t1, t2], axis)


class UpsampleConv(nn.Module):
    """`conv` (3x3, C→C, pad 1) applied to the nearest-x2 upsampled input, computed at the low resolution.

    Each of the four output phases (a, b) is a 2x2 conv of the input with the 3x3 kernel's taps
    summed where they read the same input pixel: 16 instead of 36 multiply-adds per output pixel,
    and the 4x larger upsampled tensor is never built. Same parameters as `nn.Conv` (`kernel`, `bias`).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        # phase_kernels[a][b]: the 2x2 kernel for output rows of parity a and columns of parity b
        phase_kernels = [_fold_taps(rows, 1) for rows in _fold_taps(kernel.astype(self.dtype), 0)]
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        rows = []
        for a in range(2):
            cols = [
                jax.lax.conv_general_dilated(
                    xp[:, a:a + h + 1, p:p + w + 1], phase_kernels[a][p], (1, 1), "VALID",
                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISION,
                )
                for p in range(2)
            ]
            rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2[b], Cout)
        y = jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, self.features)  # (B, H, 2[a], W, 2[b], C)
        return y + bias.astype(self.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 `conv` if `with_conv` (fused as `UpsampleConv`)."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_conv:
            return UpsampleConv(x.shape[-1], self.dtype, name="conv")(x)
        return _upsample_nearest(x)


class Downsample(nn.Module):
    """Zero-pad bottom/right by one, then a 3x3 stride-2 VALID `conv` (taming's F.pad(0,1,0,1));
    without `with_conv`, a 2x2 average pool."""

    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class MidBlock(nn.Module):
    """block_1 → attn_1 → block_2 at the lowest resolution."""

    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.dropout, self.dtype, name="block_1")(x, train)
        x = AttnBlock(self.dtype, name="attn_1")(x)
        return ResnetBlock(c, self.dropout, self.dtype, name="block_2")(x, train)


class Level(nn.Module):
    """One resolution level: res blocks, each followed by its attention block when `attention`,
    then the resampling step (`downsample`/`upsample`) unless `resample` is None."""

    out_channels: int
    num_blocks: int
    attention: bool
    resample: str | None  # "downsample", "upsample" or None
    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.config.dropout, self.dtype, name=f"block_{j}")(x, train)
            if self.attention:
                x = AttnBlock(self.dtype, name=f"attn_{j}")(x)
        if self.resample == "downsample":
            x = Downsample(self.config.resamp_with_conv, self.dtype, name="downsample")(x)
        elif self.resample == "upsample":
            x = Upsample(self.config.resamp_with_conv, self.dtype, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """(B, res, res, in_channels) → (B, h, w, z_channels)."""

    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        x = _conv(cfg.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype))
        res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            last = i == cfg.num_resolutions - 1
            x = Level(
                cfg.ch * mult, cfg.num_res_blocks, res in cfg.attn_resolutions,
                None if last else "downsample", cfg, self.dtype, name=f"down_{i}",
            )(x, train)
            res = res if last else res // 2
        x = MidBlock(cfg.dropout, self.dtype, name="mid")(x, train)
        x = _norm(self.dtype, "norm_out", swish=True)(x)
        return _conv(cfg.z_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """(B, h, w, z_channels) → (B, res, res, out_ch), raw (no output activation).

    Levels are named by resolution like taming's `decoder.up.{i}` (up_0 = full resolution) and
    run from the lowest resolution up: up_{n-1} → ... → up_0.
    """

    config: VQGANConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        x = _conv(cfg.ch * cfg.ch_mult[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(cfg.dropout, self.dtype, name="mid")(x, train)
        res = cfg.latent_size
        for i in reversed(range(cfg.num_resolutions)):
            x = Level(
                cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                "upsample" if i > 0 else None, cfg, self.dtype, name=f"up_{i}",
            )(x, train)
            res = res * 2 if i > 0 else res
        x = _norm(self.dtype, "norm_out", swish=True)(x)
        return _conv(cfg.out_ch, 3, self.dtype, "conv_out")(x)


def _codebook_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """taming's codebook init: uniform(-1/n_embed, 1/n_embed)."""
    return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])


class VectorQuantizer(nn.Module):
    """The codebook (`embedding/embedding`, (n_embed, embed_dim)) and nearest-code lookup."""

    n_embed: int
    embed_dim: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = nn.Embed(self.n_embed, self.embed_dim, dtype=self.dtype,
                                  embedding_init=_codebook_init)

    def nearest(self, z: jax.Array) -> jax.Array:
        """Index of the nearest code for each vector of z (..., embed_dim); ties go to the lowest index.

        Distances are |z|² + |e|² − 2 z·e, in that order, as taming and vqgan-jax compute them.
        """
        table = self.embedding.embedding.astype(jnp.float32)
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        d = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            + jnp.sum(table**2, axis=1)
            - 2.0 * jnp.dot(flat, table.T, precision=PRECISION)
        )
        return jnp.argmin(d, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

    def __call__(self, indices: jax.Array) -> jax.Array:
        """Codebook rows for `indices` (any shape) → indices.shape + (embed_dim,)."""
        return self.embedding(indices)


class VQOutput(NamedTuple):
    """What the training forward returns.

    reconstruction: decoder output (B, res, res, out_ch).
    quantized: straight-through codes z + sg(z_q - z) (B, h, w, embed_dim): forward = z_q,
        gradient flows to the encoder as if quantization were the identity.
    indices: (B, h*w) int32 codes, row-major.
    codebook_loss: mean((z_q - sg(z))²), trains the codebook.
    commitment_loss: mean((sg(z_q) - z)²), trains the encoder; taming weights it by beta = 0.25.
    latents: z, the encoder's vectors before quantization (B, h, w, embed_dim).
    """

    reconstruction: jax.Array
    quantized: jax.Array
    indices: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    latents: jax.Array


class VQModel(nn.Module):
    """Top level: encoder, quant_conv, quantize, post_quant_conv, decoder."""

    config: VQGANConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, self.dtype)
        self.quant_conv = _conv(cfg.embed_dim, 1, self.dtype)
        self.post_quant_conv = _conv(cfg.z_channels, 1, self.dtype)

    def encode(self, pixels: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """pixels (B, res, res, in_channels) → (z before quantization, z_q, indices (B, h, w))."""
        z = self.quant_conv(self.encoder(pixels, train))
        indices = self.quantize.nearest(z)
        return z, self.quantize(indices), indices

    def decode(self, quantized: jax.Array, train: bool = False) -> jax.Array:
        """(B, h, w, embed_dim) → (B, res, res, out_ch) raw decoder output."""
        return self.decoder(self.post_quant_conv(quantized), train)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """(B, h*w) codes, row-major → (B, res, res, out_ch) float32 raw decoder output."""
        side = self.config.latent_size
        if codes.shape[-1] != side * side:
            raise ValueError(f"expected {side * side} codes per image ({side}x{side}), got {codes.shape[-1]}")
        z_q = self.quantize(codes.astype(jnp.int32))
        z_q = z_q.reshape(codes.shape[0], side, side, self.config.embed_dim)
        return self.decode(z_q).astype(jnp.float32)

    def encode_pixels(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, res, res, in_channels) → (indices (B, h*w) int32, quantized (B, h, w, embed_dim) float32)."""
        _, z_q, indices = self.encode(pixels)
        return indices.reshape(indices.shape[0], -1), z_q.astype(jnp.float32)

    def __call__(self, pixels: jax.Array, train: bool = False) -> VQOutput:
        """Encode, quantize with a straight-through estimator, decode (the training forward).

        With dropout > 0 and train=True, pass rngs={"dropout": key} to apply.
        """
        z, z_q, indices = self.encode(pixels, train)
        z32, zq32 = z.astype(jnp.float32), z_q.astype(jnp.float32)
        codebook_loss = jnp.mean((zq32 - jax.lax.stop_gradient(z32)) ** 2)
        commitment_loss = jnp.mean((jax.lax.stop_gradient(zq32) - z32) ** 2)
        quantized = z + jax.lax.stop_gradient(z_q - z)
        reconstruction = self.decode(quantized, train).astype(jnp.float32)
        return VQOutput(reconstruction, quantized, indices.reshape(indices.shape[0], -1),
                        codebook_loss, commitment_loss, z)


# ---------------------------------------------------------------------------------------------
# Pure functions (jit-compiled once per module, which is hashable and static)


@partial(jax.jit, static_argnums=0)
def _decode_codes(module: VQModel, params: Tree, codes: jax.Array) -> jax.Array:
    def decode(batch: jax.Array) -> jax.Array:
        return module.apply({"params": params}, batch, method=VQModel.decode_codes)

    if jax.default_backend() == "cpu" and codes.shape[0] > 1:
        # One image at a time on CPU: a 256x256x128 activation (32 MiB) stays near the cache, a
        # batch of them does not; measured ~17% less CPU time per image at batch 4.
        return jax.lax.map(lambda one: decode(one[None])[0], codes)
    return decode(codes)


def wrap_weights(size: int) -> np.ndarray:
    """Per pixel along one axis (size,): how much of the decode rolled by half along that axis
    a seamless picture takes. 1 at both edges, falling as cos² to 0 a quarter of the way in."""
    distance = np.minimum(np.arange(size) + 0.5, size - 0.5 - np.arange(size))  # to the nearest edge
    ramp = distance / (size / 4)
    return np.where(ramp < 1, np.cos(np.pi / 2 * np.minimum(ramp, 1.0)) ** 2, 0.0)


@partial(jax.jit, static_argnums=0)
def _decode_seamless(module: VQModel, params: Tree, codes: jax.Array) -> jax.Array:
    side = module.config.latent_size
    grid = codes.reshape(codes.shape[0], side, side)
    weights = jnp.asarray(wrap_weights(module.config.resolution), jnp.float32)
    along_x, along_y = weights[None, None, :, None], weights[None, :, None, None]
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            rolled = jnp.roll(grid, (dy * side // 2, dx * side // 2), axis=(1, 2)).reshape(codes.shape)
            pixels = _decode_codes(module, params, rolled)
            half = module.config.resolution // 2
            pixels = jnp.roll(pixels, (-dy * half, -dx * half), axis=(1, 2))
            out = out + pixels * (along_x if dx else 1 - along_x) * (along_y if dy else 1 - along_y)
    return out


@partial(jax.jit, static_argnums=0)
def _encode_pixels(module: VQModel, params: Tree, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return module.apply({"params": params}, pixels, method=VQModel.encode_pixels)


@jax.jit
def to_uint8(images: jax.Array) -> jax.Array:
    """Decoder output → uint8 pixels the way DALL·E Mini does it: clip to [0, 1], then truncate x * 255."""
    return (jnp.clip(images, 0.0, 1.0) * 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class VQGAN:
    """A loaded VQGAN: its config, the (stateless) module and the parameter tree."""

    config: VQGANConfig
    module: VQModel
    params: Tree

    def decode_codes(self, params: Tree, codes: jax.Array, seamless: bool = False) -> jax.Array:
        """codes (B, h*w) int → (B, res, res, out_ch) float32, the raw decoder output (clip it yourself).

        `seamless` decodes the grid as a torus, for pictures that tile (module docstring)."""
        codes = jnp.asarray(codes, jnp.int32)
        return (_decode_seamless if seamless else _decode_codes)(self.module, params, codes)

    def encode_pixels(self, params: Tree, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels (B, res, res, in_channels), DALL·E Mini's [0, 1] range, fed to the encoder as they are
        → (indices (B, h*w) int32, quantized (B, h, w, embed_dim) float32)."""
        return _encode_pixels(self.module, params, jnp.asarray(pixels))

    def decode(self, codes: jax.Array, seamless: bool = False) -> jax.Array:
        """`decode_codes` with this model's own parameters."""
        return self.decode_codes(self.params, codes, seamless)

    def encode(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`encode_pixels` with this model's own parameters."""
        return self.encode_pixels(self.params, pixels)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pictures of any size and mode → their codes (N, h*w) int32, row-major: each is
        centre-cropped and resized to the model's resolution first (`image_pixels`)."""
        if not images:
            return np.zeros((0, self.config.num_codes), np.int32)
        pixels = np.stack([image_pixels(image, self.config.resolution) for image in images])
        return np.asarray(self.encode(pixels)[0], np.int32)


# ---------------------------------------------------------------------------------------------
# Pictures in


def _rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency over white, 16-bit and float greys scaled to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.nan_to_num(np.asarray(image, np.float64))
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def image_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """A picture as the VQGAN's input: the largest centred square, resized to resolution x
    resolution, as float32 RGB in [0, 1] (resolution, resolution, 3)."""
    rgb = _rgb(image)
    width, height = rgb.size
    side = min(width, height)
    if side < 1:
        raise ValueError(f"the image is empty ({width}x{height} pixels)")
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(square, np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Checkpoints


def build_vqgan(config: VQGANConfig, dtype: Any = jnp.float32) -> VQModel:
    return VQModel(config, dtype)


def init_params(module: VQModel, rng: jax.Array) -> Tree:
    """Fresh random parameters (the training starting point), as a plain nested dict."""
    cfg = module.config
    pixels = jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels), jnp.float32)
    return nn.unbox(jax.jit(module.init)(rng, pixels))["params"]


def param_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of the model built from `config`, computed without allocating weights."""
    return expected_shapes(lambda: init_params(build_vqgan(config), jax.random.PRNGKey(0)))


def _squeeze_legacy_norms(flat: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    """Accept GroupNorm params that flax <= 0.3.5 saved as (1, 1, 1, C)
    (e.g. valhalla/vqgan-imagenet-f16-1024)."""
    for key, shape in expected.items():
        leaf = flat.get(key)
        if leaf is not None and len(shape) == 1 and np.shape(leaf) == (1, 1, 1, shape[0]):
            flat[key] = np.reshape(leaf, shape)


def load_vqgan(folder: str | os.PathLike, dtype: Any = jnp.float32) -> VQGAN:
    """Load config.json + flax_model.msgpack (published layout) and check every parameter's path and shape."""
    folder = Path(folder)
    config = VQGANConfig.from_pretrained(folder)
    module = build_vqgan(config, dtype)
    flat = flatten(read_msgpack(folder / WEIGHTS_FILE))
    expected = param_shapes(config)
    _squeeze_legacy_norms(flat, expected)
    check_shapes(flat, expected, str(folder / WEIGHTS_FILE))
    return VQGAN(config, module, to_device_tree(flat, dtype))


def save_vqgan(folder: str | os.PathLike, config: VQGANConfig, params: Tree) -> None:
    """Write config.json and flax_model.msgpack in the published layout (no "params" wrapper)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_shapes(flatten(params), param_shapes(config), "params to save")
    d = {"architectures": ["VQModel"], **config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    host = unflatten({k: np.asarray(v) for k, v in flatten(params).items()})
    (folder / WEIGHTS_FILE).write_bytes(flax.serialization.msgpack_serialize(host))
