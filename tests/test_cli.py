"""`python -m dalle_app`: options, validation, progress, the grid PNG and its metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dalle_app import cli
from dalle_app import images as pngs
from dalle_app.catalog import Catalog, ModelEntry, ModelPool, load_scheduler
from tests.app_support import make_tiny_models, read_metadata, tiny_model_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture()
def pool(tiny):
    return ModelPool(Catalog([ModelEntry("tiny", "Tiny", tiny)], "tiny"), load_scheduler)


def test_cli_writes_a_grid_png_with_the_prompt_and_parameters(pool, tmp_path, capsys):
    out = tmp_path / "out" / "grid.png"
    code = cli.main(["a red square above a blue circle", "--images", "3", "--seed", "11", "--top-k", "20",
                     "--negative-prompt", "green", "--temperature", "0.8", "--cond-scale", "4", "--out", str(out),
                     "--save-images", str(tmp_path / "each")], pool=pool)
    assert code == 0
    meta = read_metadata(out)
    assert meta["prompt"] == "a red square above a blue circle" and meta["negative_prompt"] == "green"
    settings = tuple(meta[k] for k in ("num_images", "seed", "top_k", "temperature", "cond_scale"))
    assert settings == (3, 11, 20, 0.8, 4.0)
    assert sorted(meta["seeds"]) == [11, 12, 13] and len(meta["scores"]) == 3
    with Image.open(out) as grid:
        assert grid.text[pngs.PROMPT_KEY] == "a red square above a blue circle"
        assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    singles = sorted((tmp_path / "each").glob("*.png"))
    assert len(singles) == 3 and read_metadata(singles[0])["rank"] == 1
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert len(lines) == 3 and all(f"seed {s}" in line for s, line in zip(meta["seeds"], lines))
    assert "generating" in printed.err  # the progress bar


@pytest.mark.parametrize(
    "args,message",
    [
        (["   "], "Please enter a prompt"),
        (["x", "--images", "40"], "num_images must be a whole number from 1 to 16"),
        (["x", "--top-p", "0"], "top_p must be a number greater than 0"),
        (["x", "--seed", "-7"], "seed must be -1 (random)"),
        (["x", "--temperature", "nan"], "temperature must be"),
    ],
)
def test_cli_rejects_bad_options_with_the_same_messages(pool, args, message, capsys):
    assert cli.main(args, pool=pool) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_model_that_cannot_load(tiny, tmp_path, capsys):
    broken = ModelPool(Catalog([ModelEntry("gone", "Gone", tiny | {"dalle": str(tmp_path / "nope")})], "gone"),
                       load_scheduler)
    assert cli.main(["a red square"], pool=broken) == 1
    assert "Could not load model 'gone'" in capsys.readouterr().err


def test_stderr_bar_without_tqdm(capsys):
    bar = cli._StderrBar(4, "generating")
    bar.update(2)
    bar.update(2)
    bar.close()
    assert "[" + "#" * 30 + "] 4/4" in capsys.readouterr().err


def test_python_dash_m_with_a_model_folder(tiny, tmp_path):
    """The real entry point, in a fresh process, with the model given as dalle+vqgan+clip folders."""
    out = tmp_path / "grid.png"
    env = os.environ | {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dalle_app", "a purple diamond", "--images", "2", "--seed", "5",
         "--model", tiny_model_spec(tiny), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_metadata(out)["seeds"] in ([5, 6], [6, 5])
    assert "seed 5" in done.stdout and "seed 6" in done.stdout


def test_grid_shape_and_unicode_metadata(tmp_path):
    assert [pngs.grid_shape(n) for n in (1, 2, 3, 4, 9, 10, 16)] == [
        (1, 1), (2, 1), (2, 2), (2, 2), (3, 3), (4, 3), (4, 4)]
    tiles = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    path = pngs.save_png(pngs.make_grid(tiles, padding=0), tmp_path / "g.png", {"prompt": "مربع أحمر 🟥"})
    assert read_metadata(path) == {"prompt": "مربع أحمر 🟥"}
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((12, 0)) == (0, 0, 255)
        assert im.getpixel((12, 12)) == (255, 255, 255)  # the empty fourth cell
    with pytest.raises(ValueError):
        pngs.grid_shape(0)


def test_cli_completes_its_own_image_from_its_exact_codes(pool, tiny, tmp_path, capsys):
    each = tmp_path / "each"
    assert cli.main(["a red square", "--images", "1", "--seed", "3", "--out", str(tmp_path / "a.png"),
                     "--save-images", str(each)], pool=pool) == 0
    start = next(each.glob("*.png"))
    with Image.open(start) as image:
        image.load()
        original, model = pngs.read_codes(image)
    assert model == "tiny" and len(original) == 16
    again = ModelPool(pool.catalog, load_scheduler)  # the first run closed its scheduler
    done = tmp_path / "done"
    assert cli.main(["a green star", "--init-image", str(start), "--keep-rows", "3", "--images", "2",
                     "--seamless", "--out", str(tmp_path / "b.png"), "--save-images", str(done)], pool=again) == 0
    meta = read_metadata(tmp_path / "b.png")
    assert meta["keep_rows"] == 3 and meta["seamless"] is True and len(meta["start_image_sha256"]) == 64
    for path in done.glob("*.png"):
        with Image.open(path) as image:
            image.load()
            assert pngs.read_codes(image)[0][:12] == original[:12]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--keep-rows", "2"], "--keep-rows needs --init-image"),
        (["--init-image", "missing.png"], "was not found"),
        (["--init-image", "NOT_A_PICTURE"], "not a picture this app can read"),
        (["--init-image", "START", "--keep-rows", "4"], "keep_rows must be a whole number from 1 to 3"),
        (["--init-image", "START", "--keep-rows", "0"], "nothing kept"),
        (["--init-image", "START", "--keep-rows", "nan"], "got nan"),
        (["--init-image", "START", "--keep-rows", "1.5"], "not a whole number"),
    ],
)
def test_cli_rejects_bad_completions(pool, tmp_path, capsys, extra, message):
    start, text = tmp_path / "start.png", tmp_path / "note.png"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(start)
    text.write_text("not a picture")
    extra = [str(start) if a == "START" else str(text) if a == "NOT_A_PICTURE" else
             str(tmp_path / a) if a == "missing.png" else a for a in extra]
    assert cli.main(["a red square", "--out", str(tmp_path / "g.png"), *extra], pool=pool) == 2
    assert message in capsys.readouterr().err
