"""How many images one decoding loop holds on this device.

Why: a loop step reads every decoder weight once whatever the batch, so on a memory-bound
device (a GPU) a loop of 64 images costs little more per step than one of 16 and serves about
four times the images per second; on a compute-bound CPU each image adds its own work and a
larger loop only makes every request in it wait longer. The pipeline times its compiled loop
step at two sizes when it warms up; a straight line through those times predicts the step at
larger sizes, and the loop grows while that buys enough throughput and its caches fit the
memory that is free.
"""

from __future__ import annotations

from typing import Mapping

LOOP_SIZES = (16, 32, 64)
"""Loop sizes to choose from: the first is taken whenever it fits, the others when they pay."""
MIN_GAIN = 1.15
"""A larger loop is taken only when it is predicted to give at least 15% more images per second."""
LOOP_MEMORY_SHARE = 0.5
"""Share of the free memory one loop's state may take (the rest: other models, temporaries)."""
STATE_COPIES = 2
"""Copies of the loop state alive at once (the donated input and the step's output, at worst)."""


def fit_step_time(step_s: Mapping[int, float]) -> tuple[float, float]:
    """Least-squares line through measured step times {images: seconds}: (fixed_s, per_image_s),
    both ≥ 0. Needs at least two sizes."""
    if len(step_s) < 2:
        raise ValueError("need step times at two or more loop sizes to fit a line")
    sizes, times = list(step_s), list(step_s.values())
    mean_n, mean_t = sum(sizes) / len(sizes), sum(times) / len(times)
    spread = sum((n - mean_n) ** 2 for n in sizes)
    per_image = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in zip(sizes, times)) / spread)
    return max(0.0, mean_t - per_image * mean_n), per_image


def loop_bytes_per_image(decoder_layers: int, d_model: int, image_length: int, text_length: int,
                         vocab_size: int, itemsize: int) -> int:
    """Device memory one image adds to a loop: its two rows (conditional and unconditional) of
    self-attention cache, gathered cross-attention K/V and float32 logits, STATE_COPIES times."""
    kv = 2 * decoder_layers * d_model * (image_length + text_length) * itemsize
    return STATE_COPIES * 2 * (kv + 4 * vocab_size)


def largest_loop(step_s: Mapping[int, float], bytes_per_image: int, free_bytes: float,
                 sizes: tuple[int, ...] = LOOP_SIZES, min_gain: float = MIN_GAIN) -> int:
    """The loop size for a device: the smallest of `sizes`, then each larger one while the line
    through `step_s` predicts ≥ `min_gain` times the images per second of the size before and
    its state fits LOOP_MEMORY_SHARE of `free_bytes`. When even the smallest does not fit, the
    most images that do (at least 1). Without two measured sizes, the smallest."""
    budget = LOOP_MEMORY_SHARE * free_bytes
    fits = lambda n: n * bytes_per_image <= budget
    chosen = sizes[0]
    if not fits(chosen):
        return max(1, min(chosen, int(budget // max(1, bytes_per_image))))
    if len(step_s) < 2:
        return chosen
    fixed, per_image = fit_step_time(step_s)
    throughput = lambda n: n / (fixed + per_image * n)
    for n in sizes[1:]:
        if not fits(n) or throughput(n) < min_gain * throughput(chosen):
            break
        chosen = n
    return chosen

