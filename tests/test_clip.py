"""CLIP: parameter trees of the real checkpoint, loading and its errors, saving, preprocessing,
tokenizer, scoring and the contrastive forward."""

from __future__ import annotations

import dataclasses
import json
import shutil
import string
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_app.models.clip import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    UnsupportedCLIPConfig,
    build_clip,
    contrastive_loss,
    init_params,
    load_clip,
    logits_from_embeds,
    param_shapes,
    save_clip,
    torch_param_shapes,
)
from dalle_app.models.clip_preprocess import CLIPImagePreprocessor, CLIPTextTokenizer, load_clip_tokenizer
from dalle_app.models.weights import CheckpointError, read_safetensors

TINY_CONFIG = CLIPConfig(
    text=CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=52, eos_token_id=53),
    vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8, hidden_act="gelu"),
    projection_dim=8,
)


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    """Random parameters of TINY_CONFIG, initialized once (compiling is the slow part here)."""
    return init_params(build_clip(TINY_CONFIG), jax.random.PRNGKey(0))


def _spec(specs_dir: Path, naming: str) -> dict:
    return json.loads((specs_dir / f"clip_vit_base_patch32.{naming}.spec.json").read_text())


@pytest.mark.parametrize("naming", ["flax", "safetensors"])
def test_real_checkpoint_tree(specs_dir: Path, naming: str) -> None:
    """The model built from openai/clip-vit-base-patch32's config has exactly its parameters."""
    spec = _spec(specs_dir, naming)
    config = CLIPConfig.from_dict(spec["config"])
    shapes = param_shapes(config) if naming == "flax" else torch_param_shapes(config)
    assert shapes == {k: tuple(v) for k, v in spec["params"].items()}
    assert sum(int(np.prod(s)) for s in shapes.values()) == spec["num_params"]


def test_config_round_trip_and_transformers_format(reference_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPConfig as HFCLIPConfig

    config = CLIPConfig.from_pretrained(reference_dir / "clip_tiny_flax")
    assert config.text.hidden_size == 32 and config.vision.patch_size == 8 and config.projection_dim == 24
    assert CLIPConfig.from_dict(config.to_dict()) == config
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    hf = HFCLIPConfig.from_pretrained(tmp_path)
    assert (hf.text_config.eos_token_id, hf.vision_config.image_size, hf.projection_dim) == (98, 32, 24)


def test_unsupported_config() -> None:
    with pytest.raises(UnsupportedCLIPConfig, match="hidden_act='swish'"):
        CLIPConfig.from_dict({"text_config": {"hidden_act": "swish"}})
    with pytest.raises(UnsupportedCLIPConfig, match="not divisible"):
        CLIPVisionConfig(hidden_size=30, num_attention_heads=4)


def test_pooling_rule(reference_dir: Path, tiny_params: dict) -> None:
    """transformers pools at the first eos unless eos_token_id is 2; FlaxCLIP always at argmax."""
    assert CLIPTextConfig(eos_token_id=2).pools_at_argmax
    assert not CLIPTextConfig(eos_token_id=49407).pools_at_argmax
    assert load_clip(reference_dir / "clip_tiny_flax").module.text_pooling == "argmax"
    assert load_clip(reference_dir / "clip_tiny_safetensors").module.text_pooling is None

    config = dataclasses.replace(TINY_CONFIG, text=dataclasses.replace(TINY_CONFIG.text, eos_token_id=20))
    ids = jnp.array([[5, 20, 30, 5], [5, 20, 40, 5]])  # eos at 1; the largest id follows it and differs
    mask = jnp.ones_like(ids)
    for pooling, same in (("eos", True), ("argmax", False)):
        text_embeds = partial(build_clip(config, text_pooling=pooling).apply, method="text_embeds")
        emb = jax.jit(text_embeds)({"params": tiny_params}, ids, mask)
        assert np.allclose(emb[0], emb[1]) == same


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_files(reference_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_clip(tmp_path)
    shutil.copy(reference_dir / "clip_tiny_flax" / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"looked for model\.safetensors .* and flax_model\.msgpack"):
        load_clip(tmp_path)


@pytest.mark.parametrize(("folder", "weights", "param"), [
    ("clip_tiny_safetensors", "model.safetensors", r"text_projection\.weight: expected shape \(16, 32\), "
                                                  r"found \(24, 32\)"),
    ("clip_tiny_flax", "flax_model.msgpack", r"text_projection/kernel: expected shape \(32, 16\), "
                                             r"found \(32, 24\)"),
])
def test_shape_mismatch(reference_dir: Path, tmp_path: Path, folder: str, weights: str, param: str) -> None:
    folder = _copy(reference_dir / folder, tmp_path / "clip")
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=param) as err:
        load_clip(folder)
    assert weights in str(err.value)


@pytest.mark.parametrize("weights", ["model.safetensors", "flax_model.msgpack"])
def test_corrupt_weights(reference_dir: Path, tmp_path: Path, weights: str) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    shutil.copy(reference_dir / "clip_tiny_flax" / "config.json", folder)
    (folder / weights).write_bytes(b"\x93not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_clip(folder)


def test_save_load_round_trip(reference_dir: Path, tmp_path: Path) -> None:
    """Flax checkpoint → save_clip (PyTorch names) → load_clip: same parameters, same reference outputs,
    and a state dict in exactly the real checkpoint's naming and layout."""
    clip = load_clip(reference_dir / "clip_tiny_flax")
    save_clip(tmp_path, clip.config, clip.params, clip.preprocess)
    assert set(p.name for p in tmp_path.iterdir()) == {"config.json", "model.safetensors",
                                                       "preprocessor_config.json"}
    state = read_safetensors(tmp_path / "model.safetensors")
    assert {k: v.shape for k, v in state.items()} == torch_param_shapes(clip.config)
    again = load_clip(tmp_path)
    assert again.config == clip.config and again.preprocess == clip.preprocess
    jax.tree.map(np.testing.assert_array_equal, again.params, clip.params)

    exp = np.load(reference_dir / "clip_tiny_flax" / "expected.npz")
    got = again.logits_per_image(again.params, exp["pixel_values_nchw"].transpose(0, 2, 3, 1),
                                 exp["input_ids"], exp["attention_mask"])
    np.testing.assert_allclose(np.asarray(got), exp["logits_per_image"], atol=1e-4, rtol=0)


def test_old_position_ids_buffers_are_ignored(reference_dir: Path, tmp_path: Path) -> None:
    """Older PyTorch checkpoints also store the position_ids buffers."""
    from safetensors.numpy import save_file

    folder = _copy(reference_dir / "clip_tiny_safetensors", tmp_path / "clip")
    state = read_safetensors(folder / "model.safetensors")
    state["text_model.embeddings.position_ids"] = np.arange(16)[None]
    state["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    save_file(state, str(folder / "model.safetensors"))
    assert load_clip(folder).params["logit_scale"].shape == ()


def test_preprocessing_matches_transformers_pil_processor(reference_dir: Path) -> None:
    """Odd sizes, portrait/landscape, grayscale, RGBA and images smaller than the crop."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    raw = json.loads((reference_dir / "clip_tiny_safetensors" / "preprocessor_config.json").read_text())
    ours = CLIPImagePreprocessor.from_dict(raw)
    raw.pop("image_processor_type")
    theirs = CLIPImageProcessorPil(**{**raw, "crop_size": {"height": 24, "width": 20}})
    ours = CLIPImagePreprocessor.from_dict({**raw, "crop_size": {"height": 24, "width": 20}})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8)
              for shape in [(37, 53, 3), (90, 31, 3), (45, 45), (50, 70, 4)]]
    for image in images:
        expected = theirs([Image.fromarray(image)], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours([image]), expected.transpose(0, 2, 3, 1), atol=1e-6, rtol=0)
    small = CLIPImagePreprocessor(crop_size=(32, 32), do_resize=False)
    expected = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 32, "width": 32})(
        [Image.fromarray(images[0][:20, :25])], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(small([images[0][:20, :25]]), expected.transpose(0, 2, 3, 1), atol=1e-6, rtol=0)


def test_preprocessor_formats(tmp_path: Path) -> None:
    old = CLIPImagePreprocessor.from_dict({"size": 224, "crop_size": 224, "resample": 3,
                                           "feature_extractor_type": "CLIPFeatureExtractor"})
    assert old == CLIPImagePreprocessor()
    assert CLIPImagePreprocessor.from_pretrained(tmp_path, 64) == CLIPImagePreprocessor.for_image_size(64)
    old.save(tmp_path)
    assert CLIPImagePreprocessor.from_pretrained(tmp_path, 64) == old
    with pytest.raises(TypeError, match="uint8"):
        old([np.zeros((8, 8, 3), np.float32)])


def _tiny_tokenizer(max_length: int) -> CLIPTextTokenizer:
    """Letters only, no merges; the end-of-text token has the largest id, as in OpenAI's vocabulary."""
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    return CLIPTextTokenizer(CLIPTokenizer(vocab=vocab, merges=[]), max_length)


def test_tokenizer(tmp_path: Path) -> None:
    assert load_clip_tokenizer(tmp_path) is None
    _tiny_tokenizer(8).save(tmp_path)
    tok = load_clip_tokenizer(tmp_path, max_length=8)
    ids, mask = tok(["A cat", "a very long prompt"])
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, 8)
    assert ids[0].tolist() == [52, 26, 2, 0, 45, 53, 53, 53]  # "a</w>", "c", "a", "t</w>", pad = eos
    assert mask[0].tolist() == [1] * 6 + [0] * 2
    assert ids[1, 0] == 52 and ids[1, -1] == 53 and mask[1].all()  # truncated, eos kept
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="could not load the CLIP tokenizer"):
        load_clip_tokenizer(tmp_path)


def test_score_end_to_end(tmp_path: Path, tiny_params: dict) -> None:
    """save_clip with a tokenizer → load_clip → score images against prompts, batch size invariant."""
    save_clip(tmp_path, TINY_CONFIG, tiny_params, tokenizer=_tiny_tokenizer(8))
    clip = load_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["a red cat", "a blue dog"]
    scores = clip.score(images, texts, batch_size=2)
    assert scores.shape == (3, 2)
    np.testing.assert_allclose(clip.score(np.stack(images), texts, batch_size=2), scores, atol=1e-5)
    np.testing.assert_allclose(clip.score(images, texts), scores, atol=1e-5)
    ids, mask = clip.tokenizer(texts)
    direct = clip.logits_per_image(clip.params, clip.preprocess(images), ids, mask)
    np.testing.assert_allclose(direct, scores, atol=1e-5)
    with pytest.raises(ValueError, match="no tokenizer files"):
        dataclasses.replace(clip, tokenizer=None).score(images, texts)


def test_contrastive_forward_and_loss(tiny_params: dict) -> None:
    module = build_clip(TINY_CONFIG)
    ids = jnp.array([[52, 1, 2, 53, 53, 53, 53, 53], [52, 3, 53, 53, 53, 53, 53, 53]])
    mask = (jnp.arange(8) <= jnp.array([[3], [2]])).astype(jnp.int32)
    pixels = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3))

    def loss_fn(p):
        outputs = module.apply({"params": p}, ids, mask, pixels)
        return contrastive_loss(*outputs), outputs

    (loss, (image, text, scale)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(tiny_params)
    np.testing.assert_allclose(jnp.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(text, axis=-1), 1.0, atol=1e-5)
    logits = np.asarray(logits_from_embeds(image, text, scale), np.float64)
    log_sm = lambda x, axis: x - np.log(np.exp(x).sum(axis=axis, keepdims=True))  # noqa: E731
    manual = -(np.trace(log_sm(logits, 1)) + np.trace(log_sm(logits, 0))) / 4
    np.testing.assert_allclose(loss, manual, rtol=1e-5)
    assert float(jnp.abs(grads["logit_scale"])) > 0
    assert float(jnp.abs(grads["vision_model"]["embeddings"]["patch_embedding"]["kernel"]).sum()) > 0
