"""VQGAN: parameter tree of the published model, config flags, loading/saving, training forward."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from dalle_app.models.vqgan import (
    GroupNorm,
    UnsupportedVQGANConfig,
    UpsampleConv,
    VQGANConfig,
    build_vqgan,
    image_pixels,
    init_params,
    load_vqgan,
    param_shapes,
    save_vqgan,
    to_uint8,
    wrap_weights,
)
from dalle_app.models.weights import CheckpointError, flatten, unflatten

TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(8,),
                   z_channels=8, embed_dim=8, n_embed=32)


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    return init_params(build_vqgan(TINY), jax.random.PRNGKey(0))


def test_real_config_param_tree_equals_published_spec(specs_dir: Path) -> None:
    spec = json.loads((specs_dir / "vqgan_imagenet_f16_16384.spec.json").read_text())
    config = VQGANConfig.from_dict(spec["config"])
    shapes = param_shapes(config)
    assert shapes == {k: tuple(v) for k, v in spec["params"].items()}
    assert sum(int(np.prod(s)) for s in shapes.values()) == spec["num_params"] == 76_073_859
    assert (config.latent_size, config.num_codes) == (16, 256)


def test_config_reads_folder_and_ignores_transformers_keys(reference_dir: Path) -> None:
    config = VQGANConfig.from_pretrained(reference_dir / "vqgan_tiny_a")
    raw = json.loads((reference_dir / "vqgan_tiny_a" / "config.json").read_text())
    assert config.ch_mult == tuple(raw["ch_mult"]) and config.n_embed == raw["n_embed"]
    assert config.num_resolutions == raw["num_resolutions"]
    assert config.num_codes == (raw["resolution"] // 2 ** (len(raw["ch_mult"]) - 1)) ** 2


@pytest.mark.parametrize(("flag", "value"),
                         [("double_z", True), ("give_pre_end", True), ("num_resolutions", 4)])
def test_unsupported_flags_are_named(flag: str, value: object) -> None:
    with pytest.raises(UnsupportedVQGANConfig, match=flag):
        VQGANConfig.from_dict({**TINY.to_dict(), flag: value})
    assert issubclass(UnsupportedVQGANConfig, ValueError)


def test_channels_must_suit_groupnorm() -> None:
    with pytest.raises(UnsupportedVQGANConfig, match="multiple of 32"):
        VQGANConfig(ch=48, ch_mult=(1, 2), resolution=16)


def test_save_load_round_trip(tmp_path: Path, tiny_params: dict) -> None:
    save_vqgan(tmp_path, TINY, tiny_params)
    raw = flax.serialization.msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes())
    # the published layout: no "params" wrapper
    assert set(raw) == {"decoder", "encoder", "post_quant_conv", "quant_conv", "quantize"}
    vq = load_vqgan(tmp_path)
    assert vq.config == TINY
    for key, leaf in flatten(tiny_params).items():
        np.testing.assert_array_equal(np.asarray(flatten(vq.params)[key]), np.asarray(leaf))
    codes = np.arange(2 * TINY.num_codes, dtype=np.int32).reshape(2, -1) % TINY.n_embed
    images = vq.decode(codes)
    assert images.shape == (2, 16, 16, 3) and images.dtype == jnp.float32
    indices, quantized = vq.encode(np.full((1, 16, 16, 3), 0.5, np.float32))
    assert indices.shape == (1, TINY.num_codes) and indices.dtype == jnp.int32
    assert quantized.shape == (1, 8, 8, TINY.embed_dim)


def test_missing_files_are_reported(tmp_path: Path, tiny_params: dict) -> None:
    with pytest.raises(CheckpointError, match="config not found"):
        load_vqgan(tmp_path)
    save_vqgan(tmp_path, TINY, tiny_params)
    (tmp_path / "flax_model.msgpack").unlink()
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_vqgan(tmp_path)


def test_wrong_shape_names_path_expected_and_found(tmp_path: Path, tiny_params: dict) -> None:
    save_vqgan(tmp_path, TINY, tiny_params)
    flat = {k: np.asarray(v) for k, v in flatten(tiny_params).items()}
    flat["quantize/embedding/embedding"] = np.zeros((16, 8), np.float32)
    del flat["decoder/conv_out/bias"]
    (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(unflatten(flat)))
    with pytest.raises(CheckpointError) as err:
        load_vqgan(tmp_path)
    msg = str(err.value)
    assert "quantize/embedding/embedding: expected shape (32, 8), found (16, 8)" in msg
    assert "missing parameter decoder/conv_out/bias" in msg


def test_corrupt_msgpack_is_reported(tmp_path: Path, tiny_params: dict) -> None:
    save_vqgan(tmp_path, TINY, tiny_params)
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vqgan(tmp_path)


def test_legacy_groupnorm_shapes_load(tmp_path: Path, reference_dir: Path) -> None:
    """Checkpoints saved with flax <= 0.3.5 store GroupNorm params as (1, 1, 1, C)."""
    src = reference_dir / "vqgan_tiny_a"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    flat = flatten(flax.serialization.msgpack_restore((src / "flax_model.msgpack").read_bytes()))
    legacy = {k: (v.reshape(1, 1, 1, -1) if "norm" in k else v) for k, v in flat.items()}
    (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(unflatten(legacy)))
    codes = np.load(src / "expected.npz")["codes"]
    np.testing.assert_array_equal(np.asarray(load_vqgan(tmp_path).decode(codes)),
                                  np.asarray(load_vqgan(src).decode(codes)))


def test_decode_rejects_wrong_code_count(tiny_params: dict, tmp_path: Path) -> None:
    save_vqgan(tmp_path, TINY, tiny_params)
    with pytest.raises(ValueError, match="expected 64 codes"):
        load_vqgan(tmp_path).decode(np.zeros((1, 63), np.int32))


def test_groupnorm_matches_flax() -> None:
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 64)) * 3.0 + 1.5
    params = {"scale": jax.random.normal(jax.random.PRNGKey(2), (64,)),
              "bias": jax.random.normal(jax.random.PRNGKey(3), (64,))}
    want = nn.GroupNorm(num_groups=32, epsilon=1e-6).apply({"params": params}, x)
    got = GroupNorm().apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(np.asarray(GroupNorm(swish=True).apply({"params": params}, x)),
                               np.asarray(nn.swish(want)), atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 4, 4, 32), (1, 5, 3, 16)])
def test_upsample_conv_equals_nearest_upsample_then_conv(shape: tuple[int, ...]) -> None:
    x = jax.random.normal(jax.random.PRNGKey(4), shape)
    conv = nn.Conv(24, (3, 3), padding=((1, 1), (1, 1)))
    upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    params = conv.init(jax.random.PRNGKey(5), upsampled)
    params = {"params": {**params["params"], "bias": jnp.linspace(-1, 1, 24)}}
    np.testing.assert_allclose(np.asarray(UpsampleConv(24).apply(params, x)),
                               np.asarray(conv.apply(params, upsampled)), atol=2e-5)


def test_to_uint8_clips_and_truncates() -> None:
    images = jnp.array([-0.5, 0.0, 0.5, 0.999, 1.0, 7.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(to_uint8(images)), [0, 0, 127, 254, 255, 255])


def test_resampling_without_conv_has_no_resample_params() -> None:
    shapes = param_shapes(dataclasses.replace(TINY, resamp_with_conv=False))
    assert not [k for k in shapes if "sample" in k]
    assert len(shapes) == len(param_shapes(TINY)) - 4


def test_training_steps_reduce_reconstruction_loss(tiny_params: dict) -> None:
    module = build_vqgan(TINY)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    images = np.stack([np.stack([xx, yy, xx * yy], -1), np.stack([yy, 1 - xx, xx], -1)]).astype(np.float32)

    def loss_fn(params: dict) -> tuple[jax.Array, jax.Array]:
        out = module.apply({"params": params}, images, train=True)
        rec = jnp.mean((out.reconstruction - images) ** 2)
        return rec + out.codebook_loss + 0.25 * out.commitment_loss, rec

    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params: dict, opt_state: optax.OptState) -> tuple[dict, optax.OptState, jax.Array, dict]:
        (_, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rec, grads

    params, opt_state = tiny_params, optimizer.init(tiny_params)
    params, opt_state, first, grads = step(params, opt_state)
    # straight-through: the reconstruction loss reaches the encoder through the quantizer
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["quantize"]["embedding"]["embedding"]).max()) > 0
    for _ in range(15):
        params, opt_state, rec, _ = step(params, opt_state)
    assert float(rec) < 0.5 * float(first)


def test_image_pixels_centre_crops_resizes_and_converts_any_mode() -> None:
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = (255, 0, 0)  # the centred square is red, the sides black
    pixels = image_pixels(Image.fromarray(wide), 10)
    assert pixels.shape == (10, 10, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[..., 0], 1.0) and np.testing.assert_allclose(pixels[..., 1:], 0.0)
    assert image_pixels(Image.fromarray(wide), 20).shape == (20, 20, 3)
    tall = Image.fromarray(np.full((40, 8, 3), 200, np.uint8))
    np.testing.assert_allclose(image_pixels(tall, 4), 200 / 255, atol=1e-6)
    clear = Image.new("RGBA", (6, 6), (0, 0, 0, 0))  # transparent: over white
    np.testing.assert_allclose(image_pixels(clear, 6), 1.0)
    grey16 = Image.fromarray(np.full((6, 6), 65535, np.uint16))
    np.testing.assert_allclose(image_pixels(grey16, 6), 1.0)
    for mode in ("1", "L", "P", "CMYK", "LA", "I", "F", "YCbCr"):
        out = image_pixels(Image.new(mode, (9, 5)), 4)
        assert out.shape == (4, 4, 3) and 0.0 <= out.min() <= out.max() <= 1.0


def test_encode_images_matches_encoding_the_pixels(tiny_params: dict, tmp_path: Path) -> None:
    save_vqgan(tmp_path, TINY, tiny_params)
    vq = load_vqgan(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)) for _ in range(2)]
    pixels = np.stack([np.asarray(im, np.float32) / 255 for im in images])
    np.testing.assert_array_equal(vq.encode_images(images), np.asarray(vq.encode(pixels)[0]))
    assert vq.encode_images([]).shape == (0, TINY.num_codes)


def test_wrap_weights_fall_from_the_edges_to_zero_a_quarter_in() -> None:
    w = wrap_weights(64)
    assert w[0] > 0.99 and w[-1] > 0.99 and np.all(w[16:48] == 0)
    np.testing.assert_allclose(w, w[::-1])
    assert np.all(np.diff(w[:17]) <= 0)


def test_seamless_decoding_removes_the_seam_and_keeps_the_middle() -> None:
    """The embedded VQGAN on code grids that repeat every 2 codes (each scene's top-left 2x2
    codes, tiled): the wrap (last column against the first, last row against the first) is then
    the same code boundary as the one between pixels 31 and 32. Decoded seamless the two differ
    alike; decoded plainly the wrap shows the decoder's frame. Away from the edges the seamless
    picture is the plain one."""
    from dalle_app.data import batch

    vq = load_vqgan(Path(__file__).parent.parent / "assets" / "vqgan-embedded")
    images = batch(seed=3, n=4).images.astype(np.float32) / 255
    grids = np.asarray(vq.encode(images)[0]).reshape(4, 16, 16)
    codes = np.tile(grids[:, :2, :2], (1, 8, 8)).reshape(4, -1)

    def difference(pixels: np.ndarray, a: int, b: int) -> float:
        return float(np.abs(pixels[:, :, a] - pixels[:, :, b]).mean() + np.abs(pixels[:, a] - pixels[:, b]).mean())

    plain, seamless = np.asarray(vq.decode(codes)), np.asarray(vq.decode(codes, seamless=True))
    assert seamless.shape == plain.shape
    inside = difference(seamless, 31, 32)
    assert difference(seamless, -1, 0) == pytest.approx(inside, rel=0.1)
    assert difference(plain, -1, 0) > 3 * difference(plain, 31, 32)
    middle = slice(16, 48)
    np.testing.assert_allclose(seamless[:, middle, middle], plain[:, middle, middle], atol=1e-5)
