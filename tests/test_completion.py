"""Image completion and tileable pictures on the embedded model: what is kept, batching, checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_app import images as pngs
from dalle_app.data import batch
from dalle_app.models.vqgan import to_uint8
from dalle_app.pipeline import DallePipeline, image_rows
from dalle_app.request import Completion, GenerationRequest
from dalle_app.uploads import start_completion
from dalle_app.validation import ValidationError

PROMPT = "a red square above a blue circle"


@pytest.fixture(scope="module")
def pipe() -> DallePipeline:
    return DallePipeline.from_pretrained(clip=False, warmup=())


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return batch(seed=7, n=1, split="train").images[0]


def test_the_kept_rows_of_an_upload_decode_to_its_vqgan_round_trip(pipe, scene, tmp_path):
    """A wide upload is centre-cropped and resized; its top 8 code rows are kept exactly, and the
    completed pictures show the upload's VQGAN round trip there."""
    wide = Image.new("RGB", (300, 200), (0, 0, 0))
    wide.paste(Image.fromarray(scene).resize((200, 200), Image.Resampling.NEAREST), (50, 0))
    path = tmp_path / "start.png"
    wide.save(path)
    request = start_completion(GenerationRequest(PROMPT, num_images=3, seed=5), str(path), 8, pipe.vqgan)
    upload_codes = pipe.vqgan.encode_images([Image.open(path)])[0]
    assert request.completion.codes == tuple(int(c) for c in upload_codes)
    assert request.completion.keep_rows == 8 and len(request.completion.source_sha256) == 64
    codes, _ = pipe.generate_codes(image_rows(request))
    np.testing.assert_array_equal(codes[:, :128], np.broadcast_to(upload_codes[:128], (3, 128)))
    completed = np.stack([np.asarray(im, np.float32) for im in pipe.decode_images(codes)])
    round_trip = np.asarray(to_uint8(pipe.vqgan.decode(upload_codes[None])), np.float32)[0]
    kept = slice(0, 7 * 4)  # the kept rows but the last, whose pixels also see the new rows
    difference = np.abs(completed[:, kept] - round_trip[kept]).mean()
    # the decoder's group norms see the whole picture, so the kept part moves a little (measured ~5
    # of 255, against ~12 between the upload and its own round trip and ~50 to another scene's)
    other = batch(seed=8, n=1, split="train").images[0]
    other_trip = np.asarray(to_uint8(pipe.vqgan.decode(pipe.vqgan.encode_images([Image.fromarray(other)]))),
                            np.float32)[0]
    assert difference < 8.0 and difference < 0.25 * np.abs(other_trip[kept] - round_trip[kept]).mean()


@pytest.mark.parametrize("keep_rows", [1, 5, 15])
def test_completing_a_generated_png_keeps_exactly_its_first_rows_of_codes(pipe, tmp_path, keep_rows):
    made = pipe(PROMPT, num_images=1, seed=11, temperature=0.6, cond_scale=1.5).images[0][0]
    path = pngs.save_png(made.image, tmp_path / "made.png", {"prompt": PROMPT, "model": ""}, made.codes)
    request = start_completion(GenerationRequest("a green star", num_images=2, seed=3), str(path), keep_rows,
                               pipe.vqgan)
    assert request.completion.codes == tuple(int(c) for c in made.codes)  # its own codes: no round trip
    codes, _ = pipe.generate_codes(image_rows(request))
    kept = keep_rows * 16
    np.testing.assert_array_equal(codes[:, :kept], np.broadcast_to(made.codes[:kept], (2, kept)))
    assert not np.array_equal(codes[:, kept:], np.broadcast_to(made.codes[kept:], codes[:, kept:].shape))


def test_another_models_png_is_encoded_again(pipe, tmp_path, scene):
    path = pngs.save_png(Image.fromarray(scene), tmp_path / "other.png", {"model": "mega"}, [1] * 256)
    request = start_completion(GenerationRequest(PROMPT, model="embedded"), str(path), 4, pipe.vqgan)
    assert request.completion.codes == tuple(int(c) for c in pipe.vqgan.encode_images([Image.fromarray(scene)])[0])


def test_completions_batched_with_plain_requests_get_the_codes_they_get_alone(pipe, scene):
    start = tuple(int(c) for c in pipe.vqgan.encode_images([Image.fromarray(scene)])[0])
    requests = [
        GenerationRequest(PROMPT, num_images=2, seed=21, completion=Completion(start, 8)),
        GenerationRequest("a purple diamond", num_images=1, seed=40),
        GenerationRequest("a green star", num_images=1, seed=50, completion=Completion(start, 3)),
    ]
    alone = [pipe.generate_codes(image_rows(r))[0] for r in requests]
    together, _ = pipe.generate_codes([row for r in requests for row in image_rows(r)])
    np.testing.assert_array_equal(together, np.concatenate(alone))


def test_the_engine_refuses_completions_it_cannot_run(pipe):
    good = Completion(tuple([0] * 256), 8)
    for completion, message in [
        (replace(good, codes=tuple([0] * 255)), "has 255 codes"),
        (replace(good, codes=tuple([64] * 256)), "from 0 to 63"),
        (replace(good, keep_rows=16), "from 1 to 15"),
        (replace(good, keep_rows=0), "from 1 to 15"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.check(GenerationRequest(PROMPT, completion=completion))
    with pytest.raises(ValidationError, match="keep_rows must be a whole number from 1 to 15"):
        start_completion(GenerationRequest(PROMPT), Image.new("RGB", (8, 8)), 16, pipe.vqgan)


def test_seamless_requests_wrap_their_codes_and_decode_seamless(pipe):
    side = pipe.vqgan.config.latent_size
    plain = pipe(PROMPT, num_images=2, seed=9, temperature=0.6, cond_scale=1.5).images[0]
    tiled = pipe(PROMPT, num_images=2, seed=9, temperature=0.6, cond_scale=1.5, seamless=True).images[0]
    for a, b in zip(plain, tiled):
        grid = b.codes.reshape(side, side)
        np.testing.assert_array_equal(grid[:, -1], grid[:, 0])
        np.testing.assert_array_equal(grid[-1], grid[0])
        np.testing.assert_array_equal(b.codes[:side - 1], a.codes[:side - 1])  # same draws until the first copy
        expected = np.asarray(to_uint8(pipe.vqgan.decode(b.codes[None], seamless=True)))[0]
        np.testing.assert_array_equal(np.asarray(b.image), expected)
