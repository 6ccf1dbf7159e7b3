"""The one record of a generation request, shared by every layer.

`validation.validate_request` makes a `GenerationRequest` from raw user input (UI, API, CLI);
the same frozen object then goes unchanged to the scheduler, which hands it to the pipeline
inside each image's `ImageSpec`. The defaults of every setting live here and nowhere else.
This module imports nothing from the app, so any layer may import it.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_NUM_IMAGES = 9
MAX_SEED = 2**31 - 1
"""Seeds are 0..MAX_SEED; image i of a request uses `sampling.image_seed(seed, i)`."""
RANDOM_SEED = -1
"""What users type for "pick a seed at random" (the record itself always holds a real seed)."""
LOCAL_CLIENT = "local"
"""The client key of requests made in this process (the command line, scripts, tests)."""


def random_seed() -> int:
    """A fresh seed from 0 to MAX_SEED."""
    return secrets.randbelow(MAX_SEED + 1)


@dataclass(frozen=True)
class SamplingSettings:
    """How codes are drawn; the defaults are DALL·E Mini's (a model may recommend others)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    cond_scale: float = 10.0


DEFAULT_SAMPLING = SamplingSettings()
SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingSettings))


@dataclass(frozen=True)
class Completion:
    """Image completion: the first `keep_rows` rows of `codes` (a start picture's VQGAN code grid,
    row-major) are kept as they are and the model draws the rest from the prompt.

    `source_sha256` identifies the start picture: the SHA-256 of the uploaded file, or of the
    codes themselves when they are a generated image's own (no upload)."""

    codes: tuple[int, ...]
    keep_rows: int
    source_sha256: str = ""

    def kept_codes(self, side: int) -> int:
        """How many codes are forced, on a grid `side` codes wide."""
        return self.keep_rows * side


@dataclass(frozen=True)
class GenerationRequest:
    """`num_images` images of `prompt`; image i gets the seed `sampling.image_seed(seed, i)`.

    `seed` is always resolved (left out, one is drawn when the record is made), so the record
    says exactly which images it produces. `model` is the catalog name the request chose ("" when
    the caller picks the pipeline itself); `notices` are what validation changed in the input.
    `client` says whose request it is (`admission.client_key`: the logged-in user, else the
    visitor's address, else the browser session): the scheduler shares its decoding loops
    round-robin across clients, and the front end limits the images each client has waiting.
    It is not one of the `parameters()`: it never goes into summaries or image metadata.
    `completion` keeps the top rows of a start picture; `seamless` decodes pictures that tile.
    """

    prompt: str
    negative_prompt: str = ""
    model: str = ""
    num_images: int = DEFAULT_NUM_IMAGES
    seed: int = field(default_factory=random_seed)
    sampling: SamplingSettings = DEFAULT_SAMPLING
    notices: tuple[str, ...] = ()
    client: str = LOCAL_CLIENT
    completion: Completion | None = None
    seamless: bool = False

    def parameters(self) -> dict[str, Any]:
        """The request as plain JSON values (for summaries and PNG metadata)."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "num_images": self.num_images,
            "seed": self.seed,
            **asdict(self.sampling),
            "seamless": self.seamless,
            **({} if self.completion is None else {
                "keep_rows": self.completion.keep_rows, "start_image_sha256": self.completion.source_sha256}),
        }


__all__ = [
    "Completion", "DEFAULT_NUM_IMAGES", "DEFAULT_SAMPLING", "GenerationRequest", "LOCAL_CLIENT", "MAX_SEED",
    "RANDOM_SEED",
    "SAMPLING_FIELDS", "SamplingSettings", "random_seed",
]
