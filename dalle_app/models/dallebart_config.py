"""DalleBart configuration: every size and flag of a checkpoint's `config.json`.

Defaults are those of `dalle-mini` 0.1.5 (`DalleBartConfig`), so a config.json that leaves a key
out means what it meant for the original. Flags whose inference-time math this project does not
implement are refused at load (UnsupportedConfigError) instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

# Activations the feed-forward block accepts (transformers' Flax ACT2FN names).
ACTIVATION_NAMES = ("gelu", "gelu_new", "relu", "silu", "swish", "sigmoid", "tanh")


class UnsupportedConfigError(ValueError):
    """config.json asks for a DalleBart variant whose math is not implemented here."""


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    # sizes
    encoder_vocab_size: int = 50264
    image_vocab_size: int = 16384
    image_length: int = 256
    max_text_length: int = 64
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    # architecture flags
    activation_function: str = "gelu"
    use_bias: bool = False
    ln_type: str = "layernorm"
    ln_positions: str = "normformer"
    use_head_scale: bool = False
    use_cosine_attention: bool = False
    tau_init: float = 0.05
    use_absolute_position_embeddings: bool = True
    use_swin_position_embeddings: bool = False
    use_deepnet_scaling: bool = False
    use_subln_init: bool = False  # changes only the initialization: no effect on inference
    use_glu: bool = True
    use_alibi: bool = False
    sinkhorn_iters: int = 1
    use_final_ln_encoder: bool = True
    use_final_ln_decoder: bool = True
    force_ln_scale: bool = False
    scale_embedding: bool = False
    tie_word_embeddings: bool = False
    # text and generation
    normalize_text: bool = False
    init_std: float = 0.02
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # dalle-mini rewrites "deepnet" to "postln" and fills special ids with image_vocab_size.
        if self.ln_positions == "deepnet":
            object.__setattr__(self, "ln_positions", "postln")
        for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.image_vocab_size)
        self._check_supported()

    def _check_supported(self) -> None:
        refused = {
            "ln_positions": self.ln_positions != "normformer",
            "ln_type": self.ln_type != "layernorm",
            "activation_function": self.activation_function not in ACTIVATION_NAMES,
            "use_cosine_attention": self.use_cosine_attention,
            "use_swin_position_embeddings": self.use_swin_position_embeddings,
            "use_deepnet_scaling": self.use_deepnet_scaling,
            "use_alibi": self.use_alibi,
            "sinkhorn_iters": self.sinkhorn_iters != 1,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for name, bad in refused.items():
            if bad:
                raise UnsupportedConfigError(
                    f"config.json sets {name}={getattr(self, name)!r}, a DalleBart variant this app "
                    "does not implement (it supports the published DALL·E Mini/Mega architecture: "
                    "ln_positions='normformer', ln_type='layernorm', no cosine/swin/alibi "
                    "attention, no deepnet scaling, sinkhorn_iters=1, untied lm_head). Use a checkpoint with that architecture."
                )
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise UnsupportedConfigError(
                    f"config.json sets d_model={self.d_model}, not divisible by "
                    f"{side}_attention_heads={heads}."
                )

    @property
    def num_image_tokens(self) -> int:
        """Rows of the image embedding and outputs of lm_head: the codes plus BOS."""
        return self.image_vocab_size + 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DalleBartConfig":
        """Build from a config.json dict; keys that do not affect inference are ignored (among
        them `use_scan`: the loader reads the weights' layout from their names)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "DalleBartConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"DalleBart config not found: {path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
        return cls.from_dict(values)
