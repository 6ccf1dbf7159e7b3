"""The loop size follows the device: measured step times and free memory (dalle_app.loop_size)."""

from __future__ import annotations

import pytest

from dalle_app.hardware import free_memory_bytes, machine_memory_gb
from dalle_app.loop_size import (
    LOOP_MEMORY_SHARE,
    LOOP_SIZES,
    fit_step_time,
    largest_loop,
    loop_bytes_per_image,
)
from dalle_app.models.dallebart_config import DalleBartConfig
from dalle_app.scheduler import LOOP_IMAGES_ENV, Scheduler
from tests.test_scheduler import FakePipeline

PLENTY = 1e12  # bytes: memory never binds


def test_the_fitted_line_goes_through_exact_points_and_never_slopes_down():
    assert fit_step_time({1: 0.003, 9: 0.007}) == pytest.approx((0.0025, 0.0005))
    assert fit_step_time({1: 0.010, 9: 0.008}) == pytest.approx((0.009, 0.0))  # noise, not a faster step
    with pytest.raises(ValueError, match="two or more"):
        fit_step_time({9: 0.3})


def test_a_memory_bound_device_takes_the_largest_loop():
    # mega-like on a GPU: one image 2.0 ms per step, nine 2.4 ms (per-kernel overhead dominates)
    assert largest_loop({1: 0.0020, 9: 0.0024}, 10**8, PLENTY) == 64


def test_a_compute_bound_device_keeps_the_smallest_loop():
    # mini-like on a 2-core CPU: 105 ms for one image, 315 ms for nine: 32 would add 8.5% images/s
    assert largest_loop({1: 0.105, 9: 0.315}, 10**8, PLENTY) == LOOP_SIZES[0]


def test_the_loop_grows_only_while_the_gain_is_enough():
    step = {1: 0.009, 9: 0.017}  # 8 ms fixed + 1 ms per image: 32 gains 20% over 16, 64 11% over 32
    assert largest_loop(step, 10**8, PLENTY) == 32
    assert largest_loop(step, 10**8, PLENTY, min_gain=1.1) == 64


def test_memory_caps_the_loop_and_can_shrink_it_below_the_smallest_size():
    per_image = 10**8
    fits = lambda n: n * per_image / LOOP_MEMORY_SHARE
    fast = {1: 0.0020, 9: 0.0024}
    assert largest_loop(fast, per_image, fits(40)) == 32
    assert largest_loop(fast, per_image, fits(16)) == 16
    assert largest_loop(fast, per_image, fits(9.5)) == 9
    assert largest_loop(fast, per_image, fits(0.2)) == 1  # never zero: one image is tried


def test_without_two_measured_sizes_the_smallest_loop_is_used():
    assert largest_loop({}, 10**8, PLENTY) == LOOP_SIZES[0]
    assert largest_loop({9: 0.0024}, 10**8, PLENTY) == LOOP_SIZES[0]


def test_bytes_per_image_count_both_rows_of_cache_cross_attention_and_logits():
    mega = DalleBartConfig(decoder_layers=24, d_model=2048, image_length=256, max_text_length=64,
                           image_vocab_size=16415)
    per_image = loop_bytes_per_image(mega.decoder_layers, mega.d_model, mega.image_length,
                                     mega.max_text_length, mega.image_vocab_size, itemsize=2)
    # bf16 K and V (1.31 MB each per layer over 256 + 64 positions), 24 layers, two rows, two
    # copies, plus float32 logits: 252 MB
    assert per_image == pytest.approx(251.9e6, rel=1e-3)
    gpu = {1: 0.0020, 9: 0.0024}
    mega_weights = 5.3e9
    assert largest_loop(gpu, per_image, 40e9 - mega_weights) == 64
    assert largest_loop(gpu, per_image, 16e9 - mega_weights) == 16


def test_the_scheduler_takes_the_pipelines_loop_size_unless_the_environment_sets_it(monkeypatch):
    pipe = FakePipeline()
    monkeypatch.setattr(pipe, "loop_images", lambda: 32, raising=False)
    monkeypatch.delenv(LOOP_IMAGES_ENV, raising=False)
    with Scheduler(pipe, gather_s=0.0) as scheduler:
        assert scheduler.max_batch_images == 32
    monkeypatch.setenv(LOOP_IMAGES_ENV, "4")
    with Scheduler(pipe, gather_s=0.0) as scheduler:
        assert scheduler.max_batch_images == 4
    monkeypatch.setenv(LOOP_IMAGES_ENV, "lots")
    with pytest.raises(ValueError, match=f"{LOOP_IMAGES_ENV} must be a whole number"):
        Scheduler(pipe, gather_s=0.0)


def test_free_memory_on_the_cpu_is_the_machines_available_memory():
    assert 0 < free_memory_bytes() <= machine_memory_gb() * 1e9
