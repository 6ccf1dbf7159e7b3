"""CLIP (OpenAI's ViT-B/32 family) in Flax linen, for ranking generated images against the prompt.

The parameter tree uses transformers' Flax names exactly (`text_model/encoder/layers/0/self_attn/
q_proj/kernel`, `vision_model/pre_layrnorm/scale`, ...), so a `flax_model.msgpack` loads as-is;
a `model.safetensors` with transformers' PyTorch names is mapped onto it (`torch_name` says how),
and `save_clip` writes that PyTorch layout back.

Math (both towers pre-norm transformers): text = token + position embeddings, causal and padding
masked self-attention, final layer norm, pooled at the end-of-text token; vision = bias-free patch
conv, a class token, position embeddings, `pre_layrnorm`, encoder, `post_layernorm` on the class
token. Both pooled vectors go through bias-free projections; the score is
`exp(logit_scale) * cos(image, text)`.

Text pooling position, as the original implementations choose it: transformers' PyTorch CLIP uses
the first `eos_token_id` in each row unless the config's `eos_token_id` is 2 (configs from before
that fix), where it uses `argmax(input_ids)`; `FlaxCLIPModel`, the writer of every
`flax_model.msgpack`, always uses `argmax(input_ids)`. The two agree whenever the end-of-text id is
the largest id in each row, as with OpenAI's tokenizer (49407 is its last id).

Pixels are NHWC (the layout `clip_preprocess` produces); transformers' models take NCHW.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_app.models.clip_preprocess import (
    CLIPImagePreprocessor,
    CLIPTextTokenizer,
    ImagesLike,
    load_clip_tokenizer,
)
from dalle_app.models.weights import (
    CheckpointError,
    Flat,
    Tree,
    check_shapes,
    expected_shapes,
    flatten,
    read_msgpack,
    read_safetensors,
    to_device_tree,
)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
MSGPACK_FILE = "flax_model.msgpack"
LEGACY_EOS_TOKEN_ID = 2  # transformers pools at argmax(input_ids) for configs with this eos id


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's sigmoid approximation of GELU, used by the original CLIP checkpoints."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


class UnsupportedCLIPConfig(ValueError):
    """config.json asks for a CLIP variant this module does not implement."""


def _check_tower(name: str, hidden_size: int, heads: int, act: str) -> None:
    if act not in ACTIVATIONS:
        raise UnsupportedCLIPConfig(f"{name}.hidden_act={act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    if hidden_size % heads:
        raise UnsupportedCLIPConfig(f"{name}: hidden_size {hidden_size} is not divisible by "
                                    f"num_attention_heads {heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields (and defaults) that shape the text tower."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self) -> None:
        _check_tower("text_config", self.hidden_size, self.num_attention_heads, self.hidden_act)

    @property
    def pools_at_argmax(self) -> bool:
        """transformers' rule: configs from before the eos fix (eos_token_id 2) pool at argmax(input_ids)."""
        return self.eos_token_id is None or self.eos_token_id == LEGACY_EOS_TOKEN_ID


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig` fields (and defaults) that shape the vision tower."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_tower("vision_config", self.hidden_size, self.num_attention_heads, self.hidden_act)
        if self.image_size % self.patch_size:
            raise UnsupportedCLIPConfig(f"vision_config: image_size {self.image_size} is not a multiple "
                                        f"of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A transformers `CLIPConfig` (config.json of `CLIPModel` / `FlaxCLIPModel`)."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        """Read transformers' format; unknown keys (generation settings, ids2label, ...) are ignored."""
        return cls(
            text=CLIPTextConfig(**_known_fields(CLIPTextConfig, d.get("text_config") or {})),
            vision=CLIPVisionConfig(**_known_fields(CLIPVisionConfig, d.get("vision_config") or {})),
            projection_dim=int(d.get("projection_dim", 512)),
            logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)),
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CLIPConfig":
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a CLIP folder needs config.json plus "
                                  f"{SAFETENSORS_FILE} or {MSGPACK_FILE}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from e
        if d.get("model_type", "clip") != "clip":
            raise UnsupportedCLIPConfig(f"{path} describes a {d['model_type']!r} model, not a CLIP model")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """transformers' format, loadable by `CLIPModel.from_pretrained`."""
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": 1.0,
            "text_config": {**dataclasses.asdict(self.text), "model_type": "clip_text_model"},
            "vision_config": {**dataclasses.asdict(self.vision), "model_type": "clip_vision_model"},
        }


# ---------------------------------------------------------------------------------------------
# Modules (names are transformers' FlaxCLIP names)

_init = nn.initializers.normal(stddev=0.02)  # transformers' initializer_range


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x (B, L, D); mask broadcastable to (B, heads, L, L), True where attention is allowed."""
        head_dim = self.hidden_size // self.num_heads
        dense = partial(nn.Dense, self.hidden_size, dtype=self.dtype, kernel_init=_init)
        heads = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))  # noqa: E731
        q = heads(dense(name="q_proj")(x) * head_dim**-0.5)
        k = heads(dense(name="k_proj")(x))
        v = heads(dense(name="v_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:2] + (self.hidden_size,))
        return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_size: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, kernel_init=_init, name="fc1")(x)
        x = ACTIVATIONS[self.act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=_init, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c = self.config
        norm = partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
        x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, name="self_attn")(
            norm(name="layer_norm1")(x), mask)
        return x + CLIPMLP(c.intermediate_size, c.hidden_size, c.hidden_act, self.dtype, name="mlp")(
            norm(name="layer_norm2")(x))


class CLIPLayers(nn.Module):
    """The layer stack; exists for the `encoder/layers/<i>` level of the checkpoint paths."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=str(i))(x, mask)
        return x


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return CLIPLayers(self.config, self.dtype, name="layers")(x, mask)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = partial(nn.Embed, features=c.hidden_size, embedding_init=_init, dtype=self.dtype)
        tokens = embed(c.vocab_size, name="token_embedding")(input_ids)
        positions = embed(c.max_position_embeddings, name="position_embedding")(
            jnp.arange(input_ids.shape[-1]))
        return tokens + positions


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    pool_at_argmax: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """(B, L) ids and mask → pooled (B, hidden_size) at each row's end-of-text token."""
        c = self.config
        length = input_ids.shape[-1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(c, self.dtype, name="encoder")(x, mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if self.pool_at_argmax:
            position = jnp.argmax(input_ids, axis=-1)
        else:
            position = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        return x[jnp.arange(x.shape[0]), position]


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) → (B, patches + 1, hidden_size), the class token first."""
        c = self.config
        class_embedding = self.param("class_embedding", _init, (c.hidden_size,))
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", use_bias=False, dtype=self.dtype, kernel_init=_init,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (patches.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = nn.Embed(c.num_positions, c.hidden_size, embedding_init=_init, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(c.num_positions))
        return x + positions


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) → pooled (B, hidden_size): the class token after `post_layernorm`."""
        c = self.config
        norm = partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = norm(name="pre_layrnorm")(x)  # sic: transformers' spelling
        x = CLIPEncoder(c, self.dtype, name="encoder")(x)
        return norm(name="post_layernorm")(x[:, 0])


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModule(nn.Module):
    """Both towers, the projections and `logit_scale`.

    `text_pooling` is "eos" or "argmax" (see the module docstring); None follows the config.
    """

    config: CLIPConfig
    text_pooling: str | None = None
    dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        pool_at_argmax = (c.text.pools_at_argmax if self.text_pooling is None
                          else self.text_pooling == "argmax")
        self.text_model = CLIPTextTransformer(c.text, pool_at_argmax, self.dtype)
        self.vision_model = CLIPVisionTransformer(c.vision, self.dtype)
        proj = partial(nn.Dense, c.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=_init)
        self.text_projection = proj()
        self.visual_projection = proj()
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """(B, L) → unit-norm float32 (B, projection_dim)."""
        return _normalize(self.text_projection(self.text_model(input_ids, attention_mask)))

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) preprocessed pixels → unit-norm float32 (B, projection_dim)."""
        return _normalize(self.visual_projection(self.vision_model(pixel_values)))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 pixel_values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """→ (image_embeds, text_embeds, logit_scale): unit-norm embeddings and the raw (log) scale,
        what a contrastive loss needs (`contrastive_loss`)."""
        return (self.image_embeds(pixel_values), self.text_embeds(input_ids, attention_mask),
                self.logit_scale.astype(jnp.float32))


def logits_from_embeds(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """logits_per_image (N_images, N_texts) = exp(logit_scale) * cosine similarity."""
    return jnp.exp(logit_scale) * image_embeds @ text_embeds.T


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy over a batch of matching (image i, text i) pairs."""
    logits = logits_from_embeds(image_embeds, text_embeds, logit_scale)
    labels = jnp.arange(logits.shape[0])
    per_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)
    per_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0)
    return (per_image.mean() + per_text.mean()) / 2


# ---------------------------------------------------------------------------------------------
# Pure functions (jit-compiled once per module, which is hashable and static)


@partial(jax.jit, static_argnums=0)
def _text_embeds(module: CLIPModule, params: Tree, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return module.apply({"params": params}, input_ids, attention_mask, method=CLIPModule.text_embeds)


@partial(jax.jit, static_argnums=0)
def _image_embeds(module: CLIPModule, params: Tree, pixel_values: jax.Array) -> jax.Array:
    return module.apply({"params": params}, pixel_values, method=CLIPModule.image_embeds)


@partial(jax.jit, static_argnums=0)
def _logits_per_image(module: CLIPModule, params: Tree, pixel_values: jax.Array, input_ids: jax.Array,
                      attention_mask: jax.Array) -> jax.Array:
    image, text, scale = module.apply({"params": params}, input_ids, attention_mask, pixel_values)
    return logits_from_embeds(image, text, scale)


@dataclasses.dataclass(frozen=True)
class CLIP:
    """A loaded CLIP: config, the (stateless) module, parameters, image preprocessing and, when the
    folder has tokenizer files, the tokenizer."""

    config: CLIPConfig
    module: CLIPModule
    params: Tree
    preprocess: CLIPImagePreprocessor
    tokenizer: CLIPTextTokenizer | None = None

    def text_embeds(self, params: Tree, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """(B, L) int ids and mask → unit-norm float32 (B, projection_dim)."""
        return _text_embeds(self.module, params, jnp.asarray(input_ids, jnp.int32),
                            jnp.asarray(attention_mask, jnp.int32))

    def image_embeds(self, params: Tree, pixel_values: jax.Array) -> jax.Array:
        """NHWC preprocessed pixels (`self.preprocess`) → unit-norm float32 (B, projection_dim)."""
        return _image_embeds(self.module, params, jnp.asarray(pixel_values))

    def logits_per_image(self, params: Tree, pixel_values: jax.Array, input_ids: jax.Array,
                         attention_mask: jax.Array) -> jax.Array:
        """→ (N_images, N_texts) float32, exp(logit_scale) * cosine similarity."""
        return _logits_per_image(self.module, params, jnp.asarray(pixel_values),
                                 jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))

    def score(self, images: ImagesLike, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Rank-ready scores: PIL images or uint8 arrays and prompts → logits_per_image (N_images, N_texts).

        Images go through in batches of `batch_size` (the last one padded), so any number of
        images above it compiles the vision tower once.
        """
        if self.tokenizer is None:
            raise ValueError("this CLIP folder has no tokenizer files (tokenizer.json or vocab.json + "
                             "merges.txt): tokenize the prompts yourself and call logits_per_image")
        input_ids, attention_mask = self.tokenizer(texts)
        text = self.text_embeds(self.params, input_ids, attention_mask)
        pixels = self.preprocess(images)
        batch_size = min(batch_size, len(pixels))
        chunks = []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size]
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            chunks.append(self.image_embeds(self.params, padded)[:len(chunk)])
        image = jnp.concatenate(chunks)
        scale = jnp.asarray(self.params["logit_scale"], jnp.float32)
        return np.asarray(logits_from_embeds(image, text, scale))


# ---------------------------------------------------------------------------------------------
# Checkpoints: transformers' Flax names are ours; PyTorch names map onto them

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_TORCH_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def torch_name(flax_path: str) -> str:
    """`text_model/encoder/layers/0/mlp/fc1/kernel` → `text_model.encoder.layers.0.mlp.fc1.weight`."""
    *parents, leaf = flax_path.split("/")
    return ".".join(parents + [_TORCH_LEAF.get(leaf, leaf)])


def torch_shape(flax_path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Dense kernels (in, out) are stored (out, in); conv kernels HWIO are stored OIHW."""
    if flax_path.endswith("/kernel"):
        return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _from_torch(flax_path: str, array: np.ndarray) -> np.ndarray:
    if flax_path.endswith("/kernel"):
        return np.ascontiguousarray(array.T if array.ndim == 2 else array.transpose(2, 3, 1, 0))
    return array


def _to_torch(flax_path: str, array: np.ndarray) -> np.ndarray:
    """C-ordered copy in the PyTorch layout (np.ascontiguousarray would turn logit_scale's () into (1,))."""
    if flax_path.endswith("/kernel"):
        array = array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)
    return np.array(array, order="C")


def build_clip(config: CLIPConfig, dtype: Any = jnp.float32, text_pooling: str | None = None) -> CLIPModule:
    return CLIPModule(config, text_pooling, dtype)


def init_params(module: CLIPModule, rng: jax.Array) -> Tree:
    """Fresh random parameters (the training starting point), as a plain nested dict."""
    c = module.config
    ids = jnp.zeros((1, c.text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels), jnp.float32)
    return nn.unbox(jax.jit(module.init)(rng, ids, jnp.ones_like(ids), pixels))["params"]


def param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Flat {flax path: shape} of the model built from `config`, without allocating weights."""
    return expected_shapes(lambda: init_params(build_clip(config), jax.random.PRNGKey(0)))


def torch_param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """The same parameters in transformers' PyTorch naming and layout (a model.safetensors' keys)."""
    return {torch_name(p): torch_shape(p, s) for p, s in param_shapes(config).items()}


def params_from_torch(state: Flat, config: CLIPConfig, source: str) -> Flat:
    """A PyTorch-named state dict → flat Flax-named params, checked against `config`."""
    state = {k: v for k, v in state.items() if k not in _TORCH_BUFFERS}
    expected = param_shapes(config)
    check_shapes(state, {torch_name(p): torch_shape(p, s) for p, s in expected.items()}, source)
    return {p: _from_torch(p, state.pop(torch_name(p))) for p in expected}


def params_to_torch(params: Tree) -> Flat:
    """Flax-named params → PyTorch-named float32 numpy arrays (transformers' CLIPModel state dict)."""
    return {torch_name(p): _to_torch(p, np.asarray(v, np.float32)) for p, v in flatten(params).items()}


def load_clip(folder: str | os.PathLike, dtype: Any = jnp.float32) -> CLIP:
    """Load config.json with model.safetensors (PyTorch names; preferred when both exist) or
    flax_model.msgpack (Flax names), plus preprocessor_config.json and tokenizer files when present.

    `dtype` is both the parameters' and the computation's dtype; embeddings and scores are float32.
    """
    folder = Path(folder)
    config = CLIPConfig.from_pretrained(folder)
    safetensors_path, msgpack_path = folder / SAFETENSORS_FILE, folder / MSGPACK_FILE
    if safetensors_path.is_file():
        flat = params_from_torch(read_safetensors(safetensors_path), config, str(safetensors_path))
        pooling = None
    elif msgpack_path.is_file():
        flat = flatten(read_msgpack(msgpack_path))
        check_shapes(flat, param_shapes(config), str(msgpack_path))
        pooling = "argmax"  # FlaxCLIPModel's pooling, whatever the config says
    else:
        raise CheckpointError(f"no CLIP weights in {folder}: looked for {SAFETENSORS_FILE} "
                              f"(PyTorch names) and {MSGPACK_FILE} (Flax names)")
    return CLIP(
        config=config,
        module=build_clip(config, dtype, pooling),
        params=to_device_tree(flat, dtype),
        preprocess=CLIPImagePreprocessor.from_pretrained(folder, config.vision.image_size),
        tokenizer=load_clip_tokenizer(folder, config.text.max_position_embeddings),
    )


def save_clip(folder: str | os.PathLike, config: CLIPConfig, params: Tree,
              preprocess: CLIPImagePreprocessor | None = None,
              tokenizer: CLIPTextTokenizer | None = None) -> None:
    """Write config.json, model.safetensors (PyTorch names, float32) and preprocessor_config.json
    (OpenAI's processing at the model's image size unless given), plus the tokenizer's files if given:
    a folder that `load_clip` and transformers' `CLIPModel.from_pretrained` both read."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_shapes(flatten(params), param_shapes(config), "params to save")
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    save_file(params_to_torch(params), str(folder / SAFETENSORS_FILE), metadata={"format": "pt"})
    (preprocess or CLIPImagePreprocessor.for_image_size(config.vision.image_size)).save(folder)
    if tokenizer is not None:
        tokenizer.save(folder)
