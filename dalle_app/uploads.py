"""The inputs of an image completion, checked: the uploaded picture and how many code rows to keep.

An upload may arrive as a file path, a Gradio file record (a dict with "path", what the HTTP API
sends), raw bytes, a PIL image or a numpy array. It is refused with a message that says what to
do when it is not a picture, when it is too large to decode safely (a decompression bomb: a small
file that unpacks to billions of pixels) or when it is empty. The size is read from the file's
header, before any pixel is decoded.

`start_completion` turns a checked upload into the request's `Completion`: a picture the app made
(a PNG carrying its codes, `images.read_codes`, from the same model) keeps its exact codes; any
other picture is encoded by the model's VQGAN.
"""

from __future__ import annotations

import hashlib
import io
import math
import numbers
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dalle_app.images import read_codes
from dalle_app.request import Completion, GenerationRequest
from dalle_app.validation import ValidationError

if TYPE_CHECKING:
    from dalle_app.models.vqgan import VQGAN

MAX_UPLOAD_PIXELS = 50_000_000
"""Largest picture accepted (width x height): a 48-megapixel phone photo fits; its decoded RGB
pixels take 150 MB. Larger ones are refused before their pixels are decoded."""
MAX_UPLOAD_BYTES = 20 * 2**20
"""Largest upload file; the app's upload limit too."""


@dataclass(frozen=True)
class Upload:
    """A picture that passed the checks, and the SHA-256 of what was uploaded (the file's bytes, or
    the pixels when no file came) for the PNG metadata of the images made from it. `codes` and
    `codes_model`: the VQGAN codes a PNG made by this app carries, and its model (else None, "")."""

    image: Image.Image
    sha256: str
    codes: tuple[int, ...] | None = None
    codes_model: str = ""


def _too_large(width: int, height: int) -> ValidationError:
    return ValidationError(
        f"The image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); the limit is "
        f"{MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels. Scale it down and upload it again.")


def _open_bytes(data: bytes) -> Image.Image:
    if not data:
        raise ValidationError("The uploaded file is empty: choose a PNG, JPEG, WebP, GIF or BMP picture.")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValidationError(f"The uploaded file is {len(data) / 2**20:.0f} MiB; the limit is "
                              f"{MAX_UPLOAD_BYTES // 2**20} MiB. Upload a smaller picture.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise _too_large(image.width, image.height)
            image.load()  # decodes the first frame only (animations: their first picture)
        except ValidationError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValidationError(f"The image has far more than {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels, the "
                                  "limit: scale it down and upload it again.") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValidationError("The uploaded file is not a picture this app can read (or it is "
                                  "damaged): use PNG, JPEG, WebP, GIF or BMP.") from e
    return image


def _read_file(path: str | os.PathLike) -> bytes:
    file = Path(path)
    if not file.is_file():
        raise ValidationError(f"The uploaded file {file.name!r} was not found: upload it again.")
    if file.stat().st_size > MAX_UPLOAD_BYTES:
        raise ValidationError(f"The uploaded file is {file.stat().st_size / 2**20:.0f} MiB; the limit is "
                              f"{MAX_UPLOAD_BYTES // 2**20} MiB. Upload a smaller picture.")
    return file.read_bytes()


def _from_pixels(image: Image.Image) -> Upload:
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise _too_large(image.width, image.height)
    if image.width < 1 or image.height < 1:
        raise ValidationError("The image is empty (0 pixels): upload a picture.")
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height} ".encode() + image.tobytes())
    return Upload(image, digest.hexdigest())


def read_upload(value: Any) -> Upload:
    """The picture in `value` (path, Gradio file record, bytes, PIL image or array), checked; an
    `Upload` (already checked, e.g. by the front end of a Ray Serve deployment) as it is."""
    if isinstance(value, Upload):
        return value
    if isinstance(value, dict):
        value = value.get("path") or value.get("url")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValidationError("Please give an image to complete (a PNG, JPEG, WebP, GIF or BMP picture).")
    if isinstance(value, Image.Image):
        return _from_pixels(value)
    if isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or value.size == 0 or (value.ndim == 3 and value.shape[-1] not in (1, 3, 4)):
            raise ValidationError(f"The image array has shape {value.shape}; give (height, width), "
                                  "(height, width, 3) or (height, width, 4) pixels.")
        if value.shape[0] * value.shape[1] > MAX_UPLOAD_PIXELS:
            raise _too_large(value.shape[1], value.shape[0])
        pixels = value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        return _from_pixels(Image.fromarray(np.clip(np.nan_to_num(pixels), 0, 255).astype(np.uint8)))
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            raise ValidationError("Upload the image file itself: links are not fetched.")
        data = _read_file(value)
    else:
        raise ValidationError(f"The image must be an uploaded picture file (got {type(value).__name__}).")
    image = _open_bytes(data)
    codes, model = read_codes(image) or (None, "")
    return Upload(image, hashlib.sha256(data).hexdigest(), codes, model)


def check_keep_rows(value: Any, rows: int) -> int:
    """How many code rows to keep from the top: a whole number from 1 to rows - 1 (None: half)."""
    allowed = (f"keep_rows must be a whole number from 1 to {rows - 1} (the rows of the {rows}x{rows} "
               "code grid kept from the top of the image)")
    if value is None:
        return rows // 2
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(f"{allowed}; got {type(value).__name__} {value!r:.40}.")
    x = float(value)
    if math.isnan(x) or math.isinf(x):
        raise ValidationError(f"{allowed}; got {x}.")
    if not x.is_integer():
        raise ValidationError(f"{allowed}; got {value!r}, which is not a whole number.")
    if not 1 <= x <= rows - 1:
        hint = " (nothing kept: use the Generate tab)" if x == 0 else (
            " (everything kept: nothing left to draw)" if x == rows else "")
        raise ValidationError(f"{allowed}; got {int(x)}{hint}.")
    return int(x)


def start_completion(request: GenerationRequest, image: Any, keep_rows: Any, vqgan: "VQGAN") -> GenerationRequest:
    """`request` completing the picture `image` (any form `read_upload` takes, an `Upload` too)
    from its top `keep_rows` code rows; raises ValidationError for a bad picture or keep_rows."""
    config = vqgan.config
    keep = check_keep_rows(keep_rows, config.latent_size)
    upload = read_upload(image)
    own = upload.codes
    if (own is not None and upload.codes_model == request.model and len(own) == config.num_codes
            and all(0 <= c < config.n_embed for c in own)):
        codes = own
    else:
        codes = tuple(int(c) for c in vqgan.encode_images([upload.image])[0])
    return replace(request, completion=Completion(codes, keep, upload.sha256))


__all__ = ["MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "Upload", "check_keep_rows", "read_upload", "start_completion"]
