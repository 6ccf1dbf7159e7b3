"""The pipeline end to end on tiny random checkpoints: text → codes → images → CLIP ranking."""

from __future__ import annotations

import shutil
import string
from pathlib import Path

import jax
import numpy as np
import pytest

from dalle_app import runtime
from dalle_app.pipeline import (
    DallePipeline, ImageSpec, ModelMismatchError, PipelineOutput, image_rows,
)
from dalle_app.request import GenerationRequest, SamplingSettings

REFERENCE = Path(__file__).parent / "fixtures" / "reference"

runtime.configure(cache_dir=False)


def _vqgan(folder: Path, resolution: int, n_embed: int) -> Path:
    from dalle_app.models.vqgan import VQGANConfig, build_vqgan, init_params, save_vqgan

    config = VQGANConfig(ch=32, num_res_blocks=1, resolution=resolution, z_channels=8, ch_mult=(1, 2, 2),
                         attn_resolutions=(), n_embed=n_embed, embed_dim=8)
    save_vqgan(folder, config, init_params(build_vqgan(config), jax.random.PRNGKey(0)))
    return folder


def _clip(folder: Path) -> Path:
    """The reference tiny CLIP plus a letters-only tokenizer (the fixture has none)."""
    from transformers import CLIPTokenizer

    from dalle_app.models.clip_preprocess import CLIPTextTokenizer

    shutil.copytree(REFERENCE / "clip_tiny_safetensors", folder, ignore=shutil.ignore_patterns("expected*"))
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    CLIPTextTokenizer(CLIPTokenizer(vocab=vocab, merges=[]), 16).save(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    dalle = root / "dalle"
    shutil.copytree(REFERENCE / "dallebart_tiny_a", dalle, ignore=shutil.ignore_patterns("expected*"))
    return {"dalle": dalle, "vqgan": _vqgan(root / "vqgan", 16, 64), "clip": _clip(root / "clip"),
            "vqgan_5x5": _vqgan(root / "vqgan_5x5", 20, 64)}


def row(prompt: str, negative_prompt: str = "", seed: int = 0, **sampling: float) -> ImageSpec:
    """One image of a one-image request with these settings."""
    request = GenerationRequest(prompt, negative_prompt, num_images=1, seed=seed,
                                sampling=SamplingSettings(**sampling))
    return image_rows(request)[0]


@pytest.fixture(scope="module")
def pipe(models: dict[str, Path]) -> DallePipeline:
    return DallePipeline.from_pretrained(models["dalle"], models["vqgan"], models["clip"],
                                         batch_buckets=(1, 4, 8), warmup=())


def test_end_to_end(pipe: DallePipeline) -> None:
    out = pipe(["a red bus", "two cats"], num_images=3, seed=11, top_k=20)
    assert isinstance(out, PipelineOutput) and out.prompts == ["a red bus", "two cats"]
    assert [len(group) for group in out.images] == [3, 3]
    assert sorted(g.seed for g in out.images[0]) == [11, 12, 13]
    assert sorted(g.seed for g in out.images[1]) == [14, 15, 16]
    for group in out.images:
        scores = [g.score for g in group]
        assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
        for g in group:
            assert g.image.size == (16, 16) and g.image.mode == "RGB"
            assert g.codes.shape == (16,) and 0 <= g.codes.min() and g.codes.max() < 64
    assert set(out.timings) == {"encode_s", "generate_s", "decode_s", "clip_s", "total_s"}
    assert out.normalized[0].strip() == "a red bus" and out.truncated == [False, False]
    # an image regenerated alone from its reported seed is the same image
    best = out.images[1][0]
    again = pipe("two cats", num_images=1, seed=best.seed, top_k=20)
    np.testing.assert_array_equal(again.images[0][0].codes, best.codes)
    np.testing.assert_array_equal(np.asarray(again.images[0][0].image), np.asarray(best.image))


def test_batched_rows_equal_rows_alone(pipe: DallePipeline) -> None:
    """Different prompts and settings in one loop give each image what it gets alone."""
    rows = [row("a red bus", seed=3), row("two cats", "blurry", seed=4, top_k=5, top_p=0.9),
            row("a red bus", seed=5, temperature=0.5, cond_scale=3.0)]
    together, timings = pipe.generate_codes(rows)
    assert set(timings) == {"encode_s", "generate_s"}
    for one, codes in zip(rows, together):
        np.testing.assert_array_equal(pipe.generate_codes([one])[0][0], codes)


def test_a_call_splits_its_images_over_loops_of_the_pipelines_size(pipe: DallePipeline,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole = pipe("a red bus", num_images=5, seed=3, top_k=20)
    loops: list[int] = []
    generate_codes = pipe.generate_codes
    monkeypatch.setattr(pipe, "loop_images", lambda: 2)
    monkeypatch.setattr(pipe, "generate_codes", lambda rows, *a, **k: loops.append(len(rows)) or generate_codes(rows, *a, **k))
    split = pipe("a red bus", num_images=5, seed=3, top_k=20)
    assert loops == [2, 2, 1]
    monkeypatch.undo()
    assert pipe.loop_images() == 8  # never past the largest bucket (1, 4, 8) it was made with
    assert [i.seed for i in split.images[0]] == [i.seed for i in whole.images[0]]
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(split.images[0], whole.images[0]))


def test_negative_prompt_changes_only_the_unconditional_branch(pipe: DallePipeline) -> None:
    """With cond_scale 1 the guided logits are the conditional ones, so a negative prompt
    cannot change greedy codes; with guidance it does."""
    plain = [row(p, seed=1, top_k=1, cond_scale=1.0) for p in ("a red bus", "two cats")]
    negative = [row(p, "blurry photo", seed=1, top_k=1, cond_scale=1.0) for p in ("a red bus", "two cats")]
    np.testing.assert_array_equal(pipe.generate_codes(plain)[0], pipe.generate_codes(negative)[0])
    guided = [row(p, seed=1, top_k=1, cond_scale=10.0) for p in ("a red bus", "two cats")]
    guided_negative = [row(p, "blurry photo", seed=1, top_k=1, cond_scale=10.0) for p in ("a red bus", "two cats")]
    assert not np.array_equal(pipe.generate_codes(guided)[0], pipe.generate_codes(guided_negative)[0])


def test_stop_from_progress(pipe: DallePipeline) -> None:
    from dalle_app.pipeline import GenerationStopped

    with pytest.raises(GenerationStopped):
        pipe.generate_codes([row("a red bus")], progress=lambda *_: False, progress_every=4)


def test_image_rows_follow_the_seed_rule() -> None:
    request = GenerationRequest("a red bus", num_images=3, seed=2**31 - 2)
    assert [r.seed for r in image_rows(request)] == [2**31 - 2, 2**31 - 1, 0]
    assert [r.seed for r in image_rows(request, first=3)] == [1, 2, 3]
    assert all(r.request is request for r in image_rows(request))


def test_warmup_and_checks(models: dict[str, Path], pipe: DallePipeline,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    pipe.warmup([1])
    runs: list[int] = []
    generate_codes = pipe.generate_codes

    def counted(rows, *args, **kwargs):
        runs.append(len(rows))
        return generate_codes(rows, *args, **kwargs)

    monkeypatch.setattr(pipe, "generate_codes", counted)
    pipe.warmup([1, 2])
    assert runs == [2, 2, 2]  # size 1 is already warm: only size 2 compiles, then its step is timed
    assert set(pipe.step_s) == {1, 2} and all(0 <= t < 60 for t in pipe.step_s.values())
    monkeypatch.undo()
    with pytest.raises(ModelMismatchError, match="4×4 grid|5×5 grid"):
        DallePipeline.from_pretrained(models["dalle"], models["vqgan_5x5"], clip=False)
    no_tokenizer = models["clip"].parent / "clip_no_tokenizer"
    shutil.copytree(REFERENCE / "clip_tiny_safetensors", no_tokenizer, ignore=shutil.ignore_patterns("expected*"))
    with pytest.raises(ModelMismatchError, match="tokenizer"):
        DallePipeline.from_pretrained(models["dalle"], models["vqgan"], no_tokenizer)
    with pytest.raises(ValueError, match="top_p"):
        pipe("a red bus", top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        pipe("a red bus", temperature=0.0)


def test_half_precision_and_no_clip(models: dict[str, Path]) -> None:
    pipe16 = DallePipeline.from_pretrained(models["dalle"], models["vqgan"], clip=False, dtype="bfloat16",
                                           batch_buckets=(2,), warmup=())
    assert pipe16.dtype == np.dtype("bfloat16")
    out = pipe16("a red bus", num_images=2, seed=0)
    assert [np.isnan(g.score) for g in out.images[0]] == [True, True]
    assert [g.seed for g in out.images[0]] == [0, 1]  # unranked: sampling order
