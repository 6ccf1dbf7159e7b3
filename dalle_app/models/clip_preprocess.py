"""Turning images and prompts into CLIP inputs, without torch.

Images follow transformers' `CLIPImageProcessor` (its PIL backend, which made the reference
`pixel_values`): convert to RGB (transparency composited onto white), resize so the shortest side
is `size.shortest_edge` with PIL bicubic (the long side truncated, `int(edge * long / short)`),
center crop (zero padding when the image is smaller than the crop), `x * rescale_factor` in
float64 then float32, then `(x - mean) / std` in float32. The result is **NHWC** float32, the
layout `CLIPModule` takes (transformers' models take NCHW: transpose (0, 3, 1, 2) to compare).

Text goes through transformers' `CLIPTokenizer` (backed by `tokenizers`), padded and truncated to
the model's `max_position_embeddings` (77 for OpenAI's CLIP), as DALL·E Mini's notebook did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dalle_app.models.weights import CheckpointError

PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either is enough for CLIPTokenizer
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3

ImagesLike = Sequence[Image.Image | np.ndarray] | np.ndarray


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocessor:
    """The settings of a `preprocessor_config.json` that CLIP's image processing uses.

    `shortest_edge` resizes keeping the aspect ratio; `resize_to` (height, width) resizes exactly
    (a `size` of {"height", "width"}); at most one of them is set.
    """

    crop_size: tuple[int, int] = (224, 224)
    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    resample: int = PIL_BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def for_image_size(cls, image_size: int) -> "CLIPImagePreprocessor":
        """OpenAI's processing scaled to a model's input size (used when a folder has no preprocessor file)."""
        return cls(crop_size=(image_size, image_size), shortest_edge=image_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPImagePreprocessor":
        """Parse both the current format (`size: {"shortest_edge": n}`, `crop_size: {"height", "width"}`)
        and the old feature-extractor one (`size: n`, `crop_size: n`, no rescale keys)."""
        size = d.get("size", 224)
        shortest, resize_to = None, None
        if isinstance(size, int):
            shortest = size
        elif "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            resize_to = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"{PREPROCESSOR_FILE}: unsupported size {size!r} "
                             "(use {\"shortest_edge\": n} or {\"height\": h, \"width\": w})")
        crop = d.get("crop_size", 224)
        crop_size = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        defaults = cls()
        return cls(
            crop_size=crop_size,
            shortest_edge=shortest,
            resize_to=resize_to,
            resample=int(d.get("resample", defaults.resample)),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", defaults.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD)),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, image_size: int) -> "CLIPImagePreprocessor":
        """Read `preprocessor_config.json`, or fall back to `for_image_size(image_size)` when there is none."""
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            return cls.for_image_size(image_size)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"could not read {path} ({type(e).__name__}: {e}); "
                                  "fix or delete it to use OpenAI's defaults") from e

    def to_dict(self) -> dict[str, Any]:
        """The transformers (CLIPImageProcessor) format."""
        size = ({"shortest_edge": self.shortest_edge} if self.resize_to is None
                else {"height": self.resize_to[0], "width": self.resize_to[1]})
        return {
            "image_processor_type": "CLIPImageProcessor",
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "size": size,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def save(self, folder: str | os.PathLike) -> None:
        (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def __call__(self, images: ImagesLike) -> np.ndarray:
        """PIL images or uint8 arrays (H, W[, C]), or one uint8 array (N, H, W, C) → float32 (N, h, w, 3)."""
        return np.stack([self.one(image) for image in images])

    def one(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image → float32 (h, w, C), NHWC's per-image part."""
        pil = _to_pil(image)
        if self.do_convert_rgb:
            pil = _to_rgb(pil)
        if self.do_resize:
            pil = pil.resize(self._resized_size(pil.width, pil.height), resample=self.resample)
        pixels = np.asarray(pil)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.do_center_crop:
            pixels = _center_crop(pixels, *self.crop_size)
        out = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
        out = out.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            out = (out - mean) / std
        return out

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """PIL's (width, height) after resizing, computed as transformers does."""
        if self.resize_to is not None:
            return self.resize_to[1], self.resize_to[0]
        edge = self.shortest_edge
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(
            f"CLIP preprocessing takes PIL images or uint8 arrays, got an array of {array.dtype}; "
            "convert float pixels in [0, 1] with (np.clip(x, 0, 1) * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {array.shape}")
    return Image.fromarray(array)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers does; PIL's convert drops it)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Center crop (H, W, C); an image smaller than the crop is first zero-padded around its center."""
    h, w = pixels.shape[:2]
    pad_h, pad_w = max(crop_h, h), max(crop_w, w)
    if (pad_h, pad_w) != (h, w):
        padded = np.zeros((pad_h, pad_w) + pixels.shape[2:], pixels.dtype)
        top, left = math.ceil((pad_h - h) / 2), math.ceil((pad_w - w) / 2)
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, pad_h, pad_w
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return pixels[top:top + crop_h, left:left + crop_w]


class CLIPTextTokenizer:
    """Prompts → fixed-length (input_ids, attention_mask), as the model's text tower expects them."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer  # a transformers CLIPTokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """→ int32 (N, max_length) ids and mask; padded with the tokenizer's pad token, long prompts
        truncated (the end-of-text token is kept)."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer files (tokenizer.json, vocab.json, merges.txt, configs) into `folder`."""
        self.tokenizer.save_pretrained(str(folder))


def load_clip_tokenizer(folder: str | os.PathLike, max_length: int = 77) -> CLIPTextTokenizer | None:
    """The folder's CLIP tokenizer, or None when it has no tokenizer files (tokenizer.json or vocab.json)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers/transformers raise many types for a broken file
        raise CheckpointError(
            f"could not load the CLIP tokenizer in {folder} ({type(e).__name__}: {e}); "
            "it needs tokenizer.json, or vocab.json with merges.txt, as in openai/clip-vit-base-patch32"
        ) from e
    return CLIPTextTokenizer(tokenizer, max_length)
