"""DalleBart: parameter trees of the real checkpoints, loader errors, weight/compute dtypes, and the
configuration flags implemented beyond what mini/mega use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import serialization

from dalle_app.models import weights
from dalle_app.models.dallebart import (
    CheckpointError,
    DalleBart,
    DalleBartConfig,
    KV,
    UnsupportedConfigError,
    abstract_params,
    init_cache,
    load_dallebart,
    scanned_layer_shapes,
    stack_layers,
    unstack_layers,
)

TINY_UNSCANNED = "dallebart_tiny_a"
TINY_SCANNED = "dallebart_tiny_b_scanned"


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "flax_model.msgpack"):
        shutil.copy(src / name, dst / name)
    return dst


def _write_params(folder: Path, flat: dict[str, np.ndarray]) -> None:
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(weights.unflatten(flat)))


def _read_flat(folder: Path) -> dict[str, np.ndarray]:
    return weights.flatten(weights.read_msgpack(folder / "flax_model.msgpack"))


# ----------------------------------------------------------------------------------------------
# Parameter trees of the published checkpoints (no weights: jax.eval_shape)


@pytest.mark.parametrize("name", ["dallebart_mini", "dallebart_mini_scanned", "dallebart_mega", "dallebart_mega_scanned"])
def test_param_tree_matches_published_spec(specs_dir: Path, name: str) -> None:
    spec = json.loads((specs_dir / f"{name}.spec.json").read_text())
    config = DalleBartConfig.from_dict(spec["config"])
    shapes = {k: tuple(v.shape) for k, v in abstract_params(config).items()}
    if spec["config"]["use_scan"]:
        shapes = scanned_layer_shapes(shapes)
    assert shapes == {k: tuple(v) for k, v in spec["params"].items()}
    assert sum(int(np.prod(s)) for s in shapes.values()) == spec["num_params"]


@pytest.mark.parametrize("config_file", ["dalle_mini_config.json", "dalle_mega_config.json"])
def test_real_configs_are_read_in_full(specs_dir: Path, config_file: str) -> None:
    values = json.loads((specs_dir / config_file).read_text())
    config = DalleBartConfig.from_dict(values)
    for key in ("d_model", "encoder_layers", "decoder_ffn_dim", "image_vocab_size", "encoder_vocab_size",
                "decoder_start_token_id", "image_length", "max_text_length"):
        assert getattr(config, key) == values[key]
    assert config.num_image_tokens == values["image_vocab_size"] + 1


# ----------------------------------------------------------------------------------------------
# Loader errors


def test_missing_weight_file_is_named(tmp_path: Path, reference_dir: Path) -> None:
    folder = _copy_folder(reference_dir / TINY_SCANNED, tmp_path / "m")
    (folder / "flax_model.msgpack").unlink()
    with pytest.raises(CheckpointError, match=r"not found: .*m/flax_model\.msgpack"):
        load_dallebart(folder)


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_dallebart(tmp_path)


def test_corrupt_msgpack_is_reported(tmp_path: Path, reference_dir: Path) -> None:
    folder = _copy_folder(reference_dir / TINY_SCANNED, tmp_path / "m")
    data = (folder / "flax_model.msgpack").read_bytes()
    (folder / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_dallebart(folder)


@pytest.mark.parametrize(
    ("fixture", "path"),
    [
        (TINY_SCANNED, "model/decoder/layers/FlaxBartDecoderLayers/GLU_0/Dense_1/kernel"),
        (TINY_UNSCANNED, "model/encoder/layers/FlaxBartEncoderLayer_1/FlaxBartAttention_0/k_proj/kernel"),
        (TINY_UNSCANNED, "lm_head/kernel"),
    ],
)
def test_wrong_shape_names_path_expected_and_found(tmp_path: Path, reference_dir: Path, fixture: str, path: str) -> None:
    folder = _copy_folder(reference_dir / fixture, tmp_path / "m")
    flat = _read_flat(folder)
    expected = flat[path].shape
    flat[path] = flat[path][..., :-1].copy()
    _write_params(folder, flat)
    found = flat[path].shape
    with pytest.raises(CheckpointError) as err:
        load_dallebart(folder)
    assert f"parameter {path}: expected shape {expected}, found {found}" in str(err.value)


@pytest.mark.parametrize(
    ("fixture", "path"),
    [
        (TINY_SCANNED, "model/encoder/final_ln/bias"),
        (TINY_UNSCANNED, "model/decoder/layers/FlaxBartDecoderLayer_1/LayerNorm_3/scale"),
    ],
)
def test_missing_parameter_is_named(tmp_path: Path, reference_dir: Path, fixture: str, path: str) -> None:
    folder = _copy_folder(reference_dir / fixture, tmp_path / "m")
    flat = _read_flat(folder)
    shape = flat.pop(path).shape
    _write_params(folder, flat)
    with pytest.raises(CheckpointError) as err:
        load_dallebart(folder)
    assert f"missing parameter {path} (expected shape {shape})" in str(err.value)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("ln_positions", "swinv2"),
        ("ln_positions", "deepnet"),
        ("ln_type", "rmsnorm"),
        ("use_cosine_attention", True),
        ("use_swin_position_embeddings", True),
        ("use_deepnet_scaling", True),
        ("use_alibi", True),
        ("sinkhorn_iters", 3),
        ("tie_word_embeddings", True),
        ("activation_function", "smelu"),
    ],
)
def test_unsupported_flag_is_refused_at_load(tmp_path: Path, reference_dir: Path, flag: str, value) -> None:
    folder = _copy_folder(reference_dir / TINY_SCANNED, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config[flag] = value
    (folder / "config.json").write_text(json.dumps(config))
    shown = "postln" if value == "deepnet" else value  # dalle-mini rewrites deepnet to postln
    with pytest.raises(UnsupportedConfigError, match=f"{flag}={shown!r}"):
        load_dallebart(folder)
    assert issubclass(UnsupportedConfigError, ValueError)


# ----------------------------------------------------------------------------------------------
# Stored and compute dtypes


def _reference_logits(reference_dir: Path, fixture: str) -> tuple[dict, np.ndarray]:
    with np.load(reference_dir / fixture / "expected.npz") as data:
        exp = {k: data[k] for k in data.files}
    return exp, exp["logits"]


def _teacher_forced(model, exp: dict) -> jax.Array:
    hidden = jax.jit(model.encode)(model.params, exp["input_ids"], exp["attention_mask"])
    return jax.jit(model.decode)(model.params, exp["decoder_input_ids"], hidden, exp["attention_mask"])


@pytest.mark.parametrize(("stored", "fixture"), [("float16", TINY_UNSCANNED), ("bfloat16", TINY_SCANNED)])
def test_half_precision_weight_files_load(tmp_path: Path, reference_dir: Path, stored: str, fixture: str) -> None:
    folder = _copy_folder(reference_dir / fixture, tmp_path / "m")
    original = _read_flat(folder)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if stored == "bfloat16" else np.dtype(np.float16)
    _write_params(folder, {k: v.astype(np_dtype) for k, v in original.items()})
    assert all(v.dtype == np_dtype for v in _read_flat(folder).values())

    model = load_dallebart(folder, dtype=jnp.float32)  # stored half, computed in float32
    loaded = weights.flatten(model.params)
    want = unstack_layers(original)  # the module's per-layer naming
    assert set(loaded) == set(want)
    for path, leaf in loaded.items():
        assert leaf.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(leaf), want[path], rtol=1e-2, atol=1e-3, err_msg=path)

    exp, want_logits = _reference_logits(reference_dir, fixture)
    got = np.asarray(_teacher_forced(model, exp))
    assert np.abs(got - want_logits).max() < 0.05 * np.abs(want_logits).max()


@pytest.mark.parametrize(("compute", "rel_tol"), [(jnp.float16, 0.01), (jnp.bfloat16, 0.05)])
def test_half_precision_compute_stays_close_to_float32(reference_dir: Path, compute, rel_tol: float) -> None:
    exp, want = _reference_logits(reference_dir, TINY_SCANNED)
    model = load_dallebart(reference_dir / TINY_SCANNED, dtype=compute)
    assert all(leaf.dtype == compute for leaf in jax.tree_util.tree_leaves(model.params))
    got = _teacher_forced(model, exp)
    assert got.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    err = float(np.abs(np.asarray(got) - want).max())
    assert err < rel_tol * np.abs(want).max(), err

    # the cached step path runs in the same dtype and stays close to teacher forcing
    hidden = jax.jit(model.encode)(model.params, exp["input_ids"], exp["attention_mask"])
    cross = jax.jit(model.cross_kv)(model.params, hidden)
    cache = model.init_cache(exp["input_ids"].shape[0])
    assert all(x.dtype == compute for x in (*cache.k, *cache.v, *cross.k, *cross.v))
    logits, cache = jax.jit(model.decode_step)(model.params, jnp.asarray(exp["decoder_input_ids"][:, 0]),
                                               jnp.int32(0), cache, cross, exp["attention_mask"])
    assert logits.dtype == jnp.float32
    assert float(np.abs(np.asarray(logits) - want[:, 0]).max()) < rel_tol * np.abs(want).max()


def test_compute_dtype_must_be_a_float_type(reference_dir: Path) -> None:
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        load_dallebart(reference_dir / TINY_SCANNED, dtype=jnp.int8)


# ----------------------------------------------------------------------------------------------
# Implemented flags beyond mini/mega: parameter names, and cached steps equal teacher forcing


SMALL = dict(encoder_vocab_size=30, image_vocab_size=20, image_length=6, max_text_length=5, d_model=16,
             encoder_layers=2, decoder_layers=2, encoder_ffn_dim=24, decoder_ffn_dim=20,
             encoder_attention_heads=2, decoder_attention_heads=4)


@pytest.mark.parametrize(
    ("flags", "present", "absent"),
    [
        ({}, ["model/decoder/layers/FlaxBartDecoderLayer_1/GLU_0/Dense_2/kernel", "model/decoder/final_ln/bias"],
         ["proj/bias", "Dense_2/bias", "head_scale", "final_ln/scale", "LayerNorm_0/scale"]),
        ({"use_bias": True, "use_head_scale": True, "force_ln_scale": True, "scale_embedding": True,
          "activation_function": "gelu_new"},
         ["model/encoder/layers/FlaxBartEncoderLayer_0/FlaxBartAttention_0/q_proj/bias",
          "model/decoder/layers/FlaxBartDecoderLayer_1/GLU_0/Dense_2/bias",
          "model/decoder/layers/FlaxBartDecoderLayer_1/FlaxBartAttention_1/head_scale",
          "model/encoder/final_ln/scale", "model/encoder/layers/FlaxBartEncoderLayer_0/LayerNorm_0/scale"],
         ["lm_head/bias"]),
        ({"use_glu": False, "activation_function": "relu", "use_subln_init": True,
          "use_final_ln_decoder": False, "use_absolute_position_embeddings": False},
         ["model/encoder/layers/FlaxBartEncoderLayer_0/FFN_0/Dense_1/kernel", "model/encoder/final_ln/bias"],
         ["GLU_0", "model/decoder/final_ln", "embed_positions"]),
    ],
)
def test_implemented_flags(flags: dict, present: list[str], absent: list[str]) -> None:
    config = DalleBartConfig.from_dict({**SMALL, **flags})
    module = DalleBart(config)
    text = jnp.asarray(np.random.default_rng(0).integers(0, 30, (3, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], jnp.int32)
    image = jnp.asarray(np.random.default_rng(1).integers(0, 21, (3, 6)), jnp.int32)
    # random weights (no module.init: slow to run eagerly); scales near 1 so that norms matter
    rng = np.random.default_rng(2)
    params = weights.unflatten({
        path: jnp.asarray((path.endswith("scale") + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32))
        for path, leaf in abstract_params(config).items()
    })
    names = list(weights.flatten(params))
    for p in present:
        assert p in names
    for a in absent:
        assert not any(a in n for n in names), a

    def apply(method: str):
        return jax.jit(lambda *args: module.apply({"params": params}, *args, method=method))

    hidden = apply("encode")(text, mask)
    teacher = apply("decode")(image, hidden, mask)
    cross, cache = apply("cross_kv")(hidden), init_cache(config, 3)
    # one head-major (B, H, S, head_dim) array per decoder layer
    assert isinstance(cross, KV) and [x.shape for x in cross.k] == [(3, 4, 5, 4)] * 2
    assert [x.shape for x in cache.v] == [(3, 4, 6, 4)] * 2
    step = apply("decode_step")
    for t in range(6):
        logits, cache = step(image[:, t], jnp.int32(t), cache, cross, mask)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(teacher[:, t]), atol=1e-5)


def test_every_accepted_activation_is_implemented() -> None:
    from dalle_app.models.dallebart import ACTIVATIONS
    from dalle_app.models.dallebart_config import ACTIVATION_NAMES

    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)
    x = jnp.linspace(-3.0, 3.0, 7)
    exact = 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(np.asarray(ACTIVATIONS["gelu"](x)), np.asarray(exact), atol=1e-6)


def test_stack_layers_inverts_unstack_layers(reference_dir: Path) -> None:
    scanned = _read_flat(reference_dir / TINY_SCANNED)
    per_layer = unstack_layers(dict(scanned))
    assert "model/encoder/layers/FlaxBartEncoderLayer_2/GLU_0/Dense_0/kernel" in per_layer
    restacked = stack_layers(per_layer)
    assert set(restacked) == set(scanned)
    for path, leaf in scanned.items():
        np.testing.assert_array_equal(restacked[path], leaf, err_msg=path)
