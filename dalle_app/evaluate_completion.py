"""The figures of image completion and tileable images, on the embedded model (see evaluate).

* ``completion_accuracy``: held-out relation prompts whose first object is *above* the second.
  The ground truth of each is rendered, encoded by the model's VQGAN like an upload, its top
  ``keep_rows`` code rows (half the grid) kept, and the rest completed from the prompt; the share
  of completed images where the oracle finds both objects in the asked relation.
  ``completion_kept_accuracy``: the same judgement on the VQGAN round trip of the ground truth,
  the ceiling of the figure above.
* ``seamless_seam_ratio``: for tileable images (`seamless=True`: code grid wrapped by the sampler,
  decoded seamless), the mean absolute pixel difference across the wrap (last column against the
  first, last row against the first) over the mean absolute difference of adjacent columns and
  rows inside the images (``seam_ratio``); about 1 when the wrap looks like any other step
  inside the picture. ``normal_seam_ratio``: plain images of the same prompts and seeds.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dalle_app.data import Prompt, heldout_prompts, render_prompt
from dalle_app.oracle import satisfies

# complete(texts, prefix codes (len(texts), image_length), keep_rows, images per text, seed) →
# per text, its images uint8 (H, W, 3)
Completer = Callable[[list[str], np.ndarray, int, int, int], list[list[np.ndarray]]]


def seam_ratio(images: np.ndarray) -> float:
    """uint8 (N, H, W, C) → mean |difference across the wrap| / mean |difference of neighbours
    inside|, both over columns and rows and pooled over the images."""
    x = np.asarray(images, np.float32)
    across = (np.abs(x[:, :, -1] - x[:, :, 0]).mean() + np.abs(x[:, -1] - x[:, 0]).mean()) / 2
    inside = (np.abs(np.diff(x, axis=2)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2
    return float(across / inside) if inside > 0 else float("inf") if across > 0 else 1.0


def above_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """``n`` held-out relation prompts of the form 'A above B' (fewer if there are not that many)."""
    relations = [p for p in heldout_prompts(10**6, seed) if p.kind == "relation" and p.relation == "above"]
    return relations[:n]


def completion_figures(complete: Completer, encode: Callable[[np.ndarray], np.ndarray],
                       decode: Callable[[np.ndarray], np.ndarray], rows: int, n_prompts: int = 24,
                       images_per_prompt: int = 4, seed: int = 0) -> dict[str, float | int]:
    """``completion_accuracy`` and its ceiling (module docstring).

    encode: uint8 pictures (N, H, W, 3) → codes (N, image_length), as an upload is encoded;
    decode: codes → uint8 pictures."""
    prompts = above_prompts(n_prompts, seed)
    rng = np.random.default_rng(20_000 + seed)
    truth = np.stack([render_prompt(p, rng).image for p in prompts])
    codes = encode(truth)
    keep_rows = rows // 2
    completed = complete([p.text for p in prompts], codes, keep_rows, images_per_prompt, 30_000 + seed)
    right = [satisfies(image, p) for p, images in zip(prompts, completed) for image in images]
    kept = [satisfies(image, p) for p, image in zip(prompts, decode(codes))]
    return {
        "completion_accuracy": float(np.mean(right)),
        "completion_kept_accuracy": float(np.mean(kept)),
        "completion_keep_rows": keep_rows,
        "n_completion_prompts": len(prompts),
    }


def seamless_figures(render: Callable[[list[str], int, int], tuple[np.ndarray, np.ndarray]],
                     prompts: Sequence[Prompt], images_per_prompt: int, seed: int) -> dict[str, float]:
    """``seamless_seam_ratio`` and ``normal_seam_ratio`` of the same prompts and seeds.

    render(texts, images per text, seed) → (plain pictures, tileable pictures), uint8 (N, H, W, 3)."""
    normal, seamless = render([p.text for p in prompts], images_per_prompt, seed)
    return {"seamless_seam_ratio": seam_ratio(seamless), "normal_seam_ratio": seam_ratio(normal)}


def pipeline_figures(pipe: Any, settings: Mapping[str, float], seed: int = 0, n_prompts: int = 24,
                     images_per_prompt: int = 4) -> dict[str, float | int]:
    """Both sets of figures for a loaded `DallePipeline` sampling with `settings`."""
    from dalle_app.models.vqgan import to_uint8
    from dalle_app.request import Completion

    def complete(texts: list[str], codes: np.ndarray, keep_rows: int, n: int, seed: int) -> list[list[np.ndarray]]:
        completions = [Completion(tuple(int(c) for c in row), keep_rows) for row in codes]
        output = pipe(texts, num_images=n, seed=seed, completions=completions, **settings)
        return [[np.asarray(g.image.convert("RGB")) for g in ranked] for ranked in output.images]

    def encode(images: np.ndarray) -> np.ndarray:
        from PIL import Image

        return pipe.vqgan.encode_images([Image.fromarray(image) for image in images])

    def decode(codes: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(to_uint8(pipe.vqgan.decode(codes[i:i + 8])))
                               for i in range(0, len(codes), 8)])

    def render(texts: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        def pictures(seamless: bool) -> np.ndarray:
            output = pipe(texts, num_images=n, seed=seed, seamless=seamless, **settings)
            return np.stack([np.asarray(g.image.convert("RGB")) for ranked in output.images for g in ranked])

        return pictures(False), pictures(True)

    rows = pipe.vqgan.config.latent_size
    figures = completion_figures(complete, encode, decode, rows, n_prompts, images_per_prompt, seed)
    prompts = heldout_prompts(n_prompts, seed=seed)
    return {**figures, **seamless_figures(render, prompts, images_per_prompt, 40_000 + seed)}


__all__ = ["Completer", "pipeline_figures", "above_prompts", "completion_figures", "seam_ratio", "seamless_figures"]
