"""The inputs of an image completion: pictures in every form and mode, bad files, keep_rows."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_app import uploads
from dalle_app.uploads import check_keep_rows, read_upload
from dalle_app.validation import ValidationError
from tests.app_support import bomb_png


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_every_form_of_a_picture_reads_the_same(tmp_path: Path) -> None:
    image = Image.fromarray(np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3))
    data = png_bytes(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for value in (str(path), path, {"path": str(path), "meta": {"_type": "gradio.FileData"}}, data):
        upload = read_upload(value)
        np.testing.assert_array_equal(np.asarray(upload.image), np.asarray(image))
        assert len(upload.sha256) == 64
    assert read_upload(str(path)).sha256 == read_upload(data).sha256
    np.testing.assert_array_equal(np.asarray(read_upload(image).image), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(read_upload(np.asarray(image)).image), np.asarray(image))
    other = Image.fromarray(np.zeros((12, 20, 3), np.uint8))
    assert read_upload(other).sha256 != read_upload(image).sha256


@pytest.mark.parametrize(("value", "message"), [
    (None, "Please give an image"),
    ("", "Please give an image"),
    ({"path": None}, "Please give an image"),
    (b"", "empty"),
    (b"this is not a picture", "not a picture"),
    (png_bytes(Image.new("RGB", (4, 4)))[:40], "not a picture"),
    (bomb_png(20_000, 20_000), "far more than 50 megapixels"),
    (bomb_png(8_000, 7_000), "56.0 megapixels"),
    ("https://example.com/cat.png", "links are not fetched"),
    ("/nonexistent/picture.png", "not found"),
    (12, "must be an uploaded picture file"),
    (np.zeros((0, 5, 3), np.uint8), "shape"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
])
def test_bad_uploads_get_clear_messages(value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        read_upload(value)


def test_huge_pixel_array_is_refused_before_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_UPLOAD_PIXELS", 100)
    with pytest.raises(ValidationError, match="megapixels"):
        read_upload(np.zeros((11, 10, 3), np.uint8))
    assert read_upload(np.zeros((10, 10, 3), np.uint8)).image.size == (10, 10)


def test_oversized_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 100)
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))))
    with pytest.raises(ValidationError, match="MiB"):
        read_upload(path)


def test_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    image = read_upload(out.getvalue()).image.convert("RGB")
    assert image.getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize(("value", "expected"), [(None, 8), (1, 1), (15, 15), (8.0, 8), (np.int64(3), 3)])
def test_keep_rows_accepted(value: object, expected: int) -> None:
    assert check_keep_rows(value, 16) == expected


@pytest.mark.parametrize(("value", "message"), [
    (0, "from 1 to 15.*got 0 \\(nothing kept"),
    (16, "got 16 \\(everything kept"),
    (17, "got 17"),
    (-3, "got -3"),
    (2.5, "not a whole number"),
    (math.nan, "got nan"),
    (math.inf, "got inf"),
    ("8", "got str"),
    (True, "got bool"),
    ([8], "got list"),
])
def test_keep_rows_refused(value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check_keep_rows(value, 16)
