"""Training of the embedded model: tokenizers, each phase's loss going down, resume, and exported
folders that load through the app's own loaders.

One tiny end-to-end run (`--profile tiny`, a few steps per model) is shared by the tests.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dalle_app.data import batch as data_batch
from dalle_app.train.common import OptimConfig, learning_rate
from dalle_app.train.text_training import plain_normalize
from dalle_app.train.tokenizers import build_bart_tokenizer, build_clip_tokenizer, write_word_frequencies

CAPTIONS = [c for c in data_batch(123, 400, "train").captions]


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _losses(folder: Path) -> list[float]:
    return [r["loss"] for r in _log(folder) if "loss" in r and "eval_loss" not in r]


def test_plain_normalize_matches_the_app_normalizer_on_generator_captions(tmp_path: Path) -> None:
    from dalle_app.text import TextNormalizer

    write_word_frequencies(CAPTIONS, tmp_path / "words.txt")
    normalizer = TextNormalizer(tmp_path / "words.txt")
    assert all(normalizer(c) == plain_normalize(c) for c in CAPTIONS)


def test_bart_tokenizer_has_bart_special_ids_and_unconditional_input(tmp_path: Path) -> None:
    from transformers import BartTokenizerFast

    from dalle_app.text import load_tokenizer

    build_bart_tokenizer([plain_normalize(c) for c in CAPTIONS], tmp_path, vocab_size=400)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file(), name
    fast = BartTokenizerFast.from_pretrained(str(tmp_path))
    assert [fast.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    tok = load_tokenizer(tmp_path, 12)
    assert tok.encode("").ids == [0, 2] + [1] * 10
    ids = tok.encode(plain_normalize("a red square")).ids
    assert ids[0] == 0 and 2 in ids
    assert fast(plain_normalize("a red square"))["input_ids"] == ids[: ids.index(2) + 1]


def test_clip_tokenizer_loads_and_never_maps_letters_to_end_of_text(tmp_path: Path) -> None:
    from dalle_app.models.clip_preprocess import load_clip_tokenizer

    build_clip_tokenizer(CAPTIONS, tmp_path, vocab_size=400)
    tok = load_clip_tokenizer(tmp_path, 16)
    ids, mask = tok(["A Red square", "a zebra!"])
    assert ids[0, 0] == 0 and mask[0].sum() < 16
    # the first end-of-text (id 1) is right after the last real token: unseen letters are not <unk>
    for row, m in zip(ids, mask):
        assert list(row).index(1) == m.sum() - 1


def test_word_frequencies_are_sorted_counts(tmp_path: Path) -> None:
    n = write_word_frequencies(["a red square", "a blue square", "a red circle"], tmp_path / "w.txt")
    lines = (tmp_path / "w.txt").read_text().splitlines()
    assert n == 5 and lines[:3] == ["a 3", "red 2", "square 2"]


def test_learning_rate_warms_up_then_decays() -> None:
    cfg = OptimConfig(lr=1e-3, warmup=10, final_lr_ratio=0.1)
    lrs = [learning_rate(cfg, s, 100) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from dalle_app.train.__main__ import main

    out = tmp_path_factory.mktemp("run")
    assets = tmp_path_factory.mktemp("assets")
    main(["all", "--out", str(out), "--assets", str(assets), "--profile", "tiny",
          "--vqgan-steps", "10", "--clip-steps", "10", "--dallebart-steps", "10"])
    return out, assets


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["vqgan", "clip", "dallebart"])
def test_each_loss_goes_down(tiny_run: tuple[Path, Path], phase: str) -> None:
    losses = _losses(tiny_run[0] / phase)
    assert len(losses) >= 2 and losses[-1] < losses[0], losses


@pytest.mark.slow
def test_vqgan_reports_codebook_usage(tiny_run: tuple[Path, Path]) -> None:
    report = json.loads((tiny_run[0] / "vqgan" / "report.json").read_text())
    assert 0 < report["eval_usage"] <= 1 and report["eval_perplexity"] >= 1


@pytest.mark.slow
def test_exported_folders_load_through_the_app_loaders(tiny_run: tuple[Path, Path]) -> None:
    import jax.numpy as jnp

    from dalle_app.models.clip import load_clip
    from dalle_app.models.dallebart import load_dallebart
    from dalle_app.models.vqgan import load_vqgan
    from dalle_app.models.weights import flatten, read_msgpack
    from dalle_app.text import TextProcessor

    assets = tiny_run[1]
    config = json.loads((assets / "dalle-embedded" / "config.json").read_text())
    assert config["model_type"] == "dallebart" and config["normalize_text"] is True
    assert config["use_scan"] is True  # stacked layers, as the original reads them
    assert config["activation_function"] == "gelu_new"  # the profile's choice reaches config.json
    assert any("FlaxBartDecoderLayers" in k for k in flatten(read_msgpack(assets / "dalle-embedded" / "flax_model.msgpack")))
    dalle = load_dallebart(assets / "dalle-embedded")
    vqgan = load_vqgan(assets / "vqgan-embedded")
    clip = load_clip(assets / "clip-embedded")
    assert dalle.config.image_vocab_size == vqgan.config.n_embed
    assert dalle.config.image_length == vqgan.config.num_codes
    text = TextProcessor.from_pretrained(assets / "dalle-embedded")
    tokens = text(["a red square above a blue circle"])
    assert list(tokens.input_ids_uncond[0, :3]) == [0, 2, 1]
    hidden = dalle.encode(dalle.params, jnp.asarray(tokens.input_ids), jnp.asarray(tokens.attention_mask))
    assert hidden.shape == (1, dalle.config.max_text_length, dalle.config.d_model)
    images = np.asarray(vqgan.decode(np.zeros((2, vqgan.config.num_codes), np.int32)))
    assert images.shape == (2, 64, 64, 3)
    scores = clip.score(data_batch(0, 2, "train").images, ["a red square", "a blue circle"])
    assert scores.shape == (2, 2) and np.isfinite(scores).all()


@pytest.mark.slow
def test_interrupted_dallebart_resumes_to_the_same_weights(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    from dalle_app.models.dallebart import load_dallebart
    from dalle_app.models.vqgan import load_vqgan
    from dalle_app.train.dallebart_training import train_dallebart
    from dalle_app.train.profiles import PROFILES

    out, _ = tiny_run
    shutil.copytree(out / "tokenizers", tmp_path / "tokenizers")
    vq = load_vqgan(out / "vqgan" / "model")
    profile = PROFILES["tiny"]
    cfg = dataclasses.replace(profile.dallebart, steps=10)
    args = (tmp_path, vq.config, vq.params, tmp_path / "tokenizers" / "dalle", profile.max_text_length, cfg)
    train_dallebart(*args, deadline=0.0)  # stops (and saves) after its first step
    assert json.loads((tmp_path / "dallebart" / "log.jsonl").read_text().splitlines()[-1]).get("steps") == 1
    _, params, report = train_dallebart(*args)
    assert report["steps"] == 10
    assert any(r.get("resumed") for r in _log(tmp_path / "dallebart"))
    straight = load_dallebart(out / "dallebart" / "model").params
    resumed = load_dallebart(tmp_path / "dallebart" / "model").params
    from dalle_app.models.weights import flatten

    a, b = flatten(straight), flatten(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_wrong_captions_contradict_the_scene_and_name_no_heldout_combination() -> None:
    from collections import Counter

    from dalle_app.data import COLORS, SHAPES, is_heldout_pair, sample
    from dalle_app.data.captions import RELATION_WORDS
    from dalle_app.data.world import is_heldout_triple
    from dalle_app.train.clip_training import wrong_caption

    def named(caption: str) -> list[tuple[str, str]]:
        words = caption.split()
        return [(c, x) for c, x in zip(words, words[1:]) if c in COLORS and x in SHAPES]

    rng = np.random.default_rng(0)
    kinds = {"swapped": 0, "shape changed": 0}
    for _ in range(300):
        s = sample(rng, "train")
        wrong = wrong_caption(s, rng)
        pairs = named(wrong)
        assert not any(is_heldout_pair(*p) for p in pairs), (s.caption, wrong)
        if s.relation is None:
            o = s.objects[0]
            assert pairs and pairs[0] != (o.color, o.shape), (s.caption, wrong)
            continue
        truth = [(o.color, o.shape) for o in s.objects]
        said = next((r for r, ws in RELATION_WORDS.items() if any(f" {w} " in wrong for w in ws)), None)
        if sorted(pairs) == sorted(truth):  # the objects swapped: said the wrong way round
            kinds["swapped"] += 1
            assert said is not None, (s.caption, wrong)  # a relation-free caption would be true either way round
            assert " and " not in wrong
            first = 0 if wrong.find(" ".join(truth[0])) < wrong.find(" ".join(truth[1])) else 1
            assert (first == 1) == (said == s.relation), (s.caption, wrong)
        else:  # one object's shape changed, colours kept
            kinds["shape changed"] += 1
            assert sorted(c for c, _ in pairs) == sorted(c for c, _ in truth), (s.caption, wrong)
            assert sum((Counter(pairs) - Counter(truth)).values()) == 1, (s.caption, wrong)
        if said is not None:  # "A and B" names no relation
            a, b = pairs
            assert not is_heldout_triple(a, said, b), (s.caption, wrong)
    assert min(kinds.values()) > 40, kinds


def test_near_miss_images_contradict_their_caption_and_stay_in_training() -> None:
    """The oracle finds the caption's scene false on each near miss (the size only counts when the
    caption names it, the relation only when it has a relation word), and no held-out pair."""
    from dalle_app.data import Prompt, Target, is_heldout_pair, sample
    from dalle_app.data.captions import SIZE_WORDS
    from dalle_app.oracle import detect, matches, satisfies
    from dalle_app.train.clip_training import near_miss

    rng = np.random.default_rng(0)
    sizes = {w for options in SIZE_WORDS.values() for w in options}
    for _ in range(150):
        s = sample(rng, "train")
        words = s.caption.split()
        named = [o.size if sizes & set(words) and s.relation is None else None for o in s.objects]
        targets = [Target(o.color, o.shape, z) for o, z in zip(s.objects, named)]
        image = near_miss(s, rng)
        if "and" in words:  # "a red square and a blue circle": both objects, anywhere
            assert not all(any(matches(d, t) for d in detect(image)) for t in targets), s.caption
        else:
            told = Prompt(s.caption, targets, s.relation, "single" if s.relation is None else "relation")
            assert not satisfies(image, told), s.caption
        assert not any(is_heldout_pair(d.color, d.shape) for d in detect(image) if d.shape), s.caption


def test_analogy_quadruples_cross_two_colours_with_two_shapes_of_training_pairs() -> None:
    """Each quadruple is (c1 s1, c1 s2, c2 s1, c2 s2) of training pairs, one size at one place on
    one background: the four differ in colour and shape only."""
    from dalle_app.data import is_heldout_pair
    from dalle_app.oracle import detect
    from dalle_app.train.clip_training import analogy_quads

    quads = analogy_quads(12, np.random.default_rng(0))
    assert quads.shape == (48, 64, 64, 3)
    for four in quads.reshape(12, 4, 64, 64, 3):
        found = [detect(image) for image in four]
        assert all(len(f) == 1 for f in found)
        (a, b, c, d) = (f[0] for f in found)
        assert a.color == b.color != c.color == d.color and a.shape == c.shape != b.shape == d.shape
        assert len({(o.size, o.center) for o in (a, b, c, d)}) == 1
        assert not any(is_heldout_pair(o.color, o.shape) for o in (a, b, c, d))
        background = (four == four[0]).all(axis=(0, -1)) & (four[0] == four[3]).all(axis=-1)
        assert background.mean() > 0.6  # everywhere but the objects, the same pixels


def test_analogy_loss_adds_the_parallelogram_residual_of_the_quadruples() -> None:
    import jax

    from dalle_app.hub import EMBEDDED_FOLDERS
    from dalle_app.models.clip import build_clip, init_params
    from dalle_app.models.clip_preprocess import CLIPImagePreprocessor, load_clip_tokenizer
    from dalle_app.train.clip_training import loss_and_metrics, model_config, model_inputs, render_batch

    tokenizer = load_clip_tokenizer(EMBEDDED_FOLDERS["clip"], 32)
    module = build_clip(model_config(tokenizer.vocab_size, width=32, layers=1))
    params = init_params(module, jax.random.PRNGKey(0))
    preprocess = CLIPImagePreprocessor.for_image_size(64)
    batch = model_inputs(render_batch(0, 0, 6, "train", analogies=3), preprocess, tokenizer)
    assert batch["pixels"].shape[0] == 6 + 6 + 12
    plain, _ = loss_and_metrics(module, params, batch)
    weighted, metrics = loss_and_metrics(module, params, batch, analogy_weight=1e4)  # fresh weights: a tiny residual
    quads = np.asarray(module.apply({"params": params}, batch["pixels"][12:], method=module.image_embeds))
    residual = quads[0::4] - quads[1::4] - quads[2::4] + quads[3::4]
    assert np.isclose(float(metrics["analogy_residual"]), np.mean(np.sum(residual**2, -1)), rtol=1e-4)
    assert float(metrics["analogy_residual"]) > 0
    assert np.isclose(float(weighted - plain), 1e4 * float(metrics["analogy_residual"]), rtol=1e-3)
    assert float(metrics["loss"]) == pytest.approx(float(plain))  # the reported loss stays the contrastive one


def test_object_weights_mark_the_drawn_shapes() -> None:
    import jax.numpy as jnp

    from dalle_app.data import ObjectSpec
    from dalle_app.data.shapes import render
    from dalle_app.train.vqgan_training import object_weights

    rng = np.random.default_rng(0)
    image = render([ObjectSpec("blue", "square", "large", (20.0, 20.0))], [20.0], rng)
    w = np.asarray(object_weights(jnp.asarray(image[None] / 255.0, jnp.float32), 4.0))[0, ..., 0]
    assert w[20, 20] == 5.0 and w[50, 50] == 1.0
    assert 0.05 < (w > 1).mean() < 0.15  # about the square's 20x20 pixels


def test_mosaics_move_whole_cells_and_the_locality_loss_sees_moved_vectors() -> None:
    import jax.numpy as jnp

    from dalle_app.train.vqgan_training import locality_loss, shuffle_cells

    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    order = np.array([3, 0, 2, 1])  # 2x2 cells of 4x4 pixels
    y = np.asarray(shuffle_cells(jnp.asarray(x), jnp.asarray(order), 4))
    assert np.array_equal(y[:, :4, :4], x[:, 4:, 4:]) and np.array_equal(y[:, :4, 4:], x[:, :4, :4])
    assert np.array_equal(y[:, 4:, :4], x[:, 4:, :4]) and np.array_equal(y[:, 4:, 4:], x[:, :4, 4:])
    latents = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 5)), jnp.float32)
    moved = shuffle_cells(latents, jnp.asarray(order), 1)  # one vector per cell
    assert float(locality_loss(latents, moved, jnp.asarray(order))) == 0.0
    assert float(locality_loss(latents, latents, jnp.asarray(order))) > 0.1


def test_codes_made_consistent_give_each_color_of_an_image_one_code() -> None:
    from dalle_app.train.codes import code_consistency, color_consistent_codes

    image = np.zeros((1, 8, 8, 3), np.float32)
    image[0, :4, :4] = 1.0  # one white cell, three black ones
    local = np.array([[7, 2, 2, 2]])
    assert code_consistency(image, local, 4) == 1.0
    assert code_consistency(image, np.array([[7, 2, 5, 2]]), 4) == 0.75
    assert np.array_equal(color_consistent_codes(image, np.array([[7, 2, 5, 2]]), 4), local)
    assert np.array_equal(color_consistent_codes((image * 255).astype(np.uint8), np.array([[7, 5, 5, 2]]), 4),
                          [[7, 5, 5, 5]])


def test_color_purity_counts_cells_on_codes_another_colour_owns() -> None:
    from dalle_app.train.codes import color_purity, palette_cells

    palette = np.array([[255, 0, 0], [0, 255, 0]])
    image = np.full((1, 8, 8, 3), 255, np.uint8)  # cells: red, green / red, white (no palette colour)
    image[0, :4, :4] = palette[0]
    image[0, :4, 4:] = palette[1]
    image[0, 4:, :4] = palette[0]
    labels = palette_cells(image, 4, palette)
    assert labels.tolist() == [[0, 1, 0, -1]]
    assert color_purity(np.array([[1, 4, 2, 3]]), labels, 8, 2) == 1.0
    assert color_purity(np.array([[1, 1, 2, 3]]), labels, 8, 2) == pytest.approx(2 / 3)  # red and green share 1


def test_a_colour_sharing_its_codes_gets_a_code_of_its_own() -> None:
    from dalle_app.train.vqgan_training import PALETTE, _separate_colors

    side, table = 4, np.zeros((6, 2), np.float32)
    params = {"quantize": {"embedding": {"embedding": table}}}
    image = np.full((1, 8, 8, 3), 1.0, np.float32)  # cells: colour 0, colour 1, colour 0, white
    image[0, :4, :4] = image[0, 4:, :4] = PALETTE[0] / 255
    image[0, :4, 4:] = PALETTE[1] / 255
    z = np.array([[1, 1], [5, 7], [3, 3], [9, 9]], np.float32)
    usage = np.array([50, 40, 0, 30, 3, 8])

    def encode_to(codes):
        return lambda p, x: (z, np.array([codes]))

    moved, count = _separate_colors(params, usage, encode_to([1, 1, 1, 3]), image, side)
    assert count == 1  # colour 0 owns code 1 (two cells); colour 1's cell gets code 2, the least used spare
    assert np.array_equal(np.asarray(moved["quantize"]["embedding"]["embedding"])[2], [5, 7])
    assert _separate_colors(params, usage, encode_to([1, 4, 1, 3]), image, side)[1] == 0


@pytest.mark.slow
def test_a_vqgan_that_mixes_colours_stops_the_run_with_what_to_do(tmp_path: Path) -> None:
    from dalle_app.train.profiles import PROFILES
    from dalle_app.train.vqgan_training import train_vqgan

    tiny = PROFILES["tiny"]
    with pytest.raises(SystemExit, match="mix object colours.*another --seed"):
        train_vqgan(tmp_path, tiny.vqgan_model, dataclasses.replace(tiny.vqgan, steps=2, min_color_purity=1.01))


@pytest.mark.slow
def test_export_falls_back_to_float16_over_the_size_limit(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    from dalle_app.models.clip import load_clip
    from dalle_app.models.dallebart import load_dallebart
    from dalle_app.models.vqgan import load_vqgan
    from dalle_app.models.weights import flatten, read_msgpack, read_safetensors
    from dalle_app.train.phases import export

    fp32 = export(tiny_run[0], tmp_path / "fp32")
    fp16 = export(tiny_run[0], tmp_path / "fp16", max_bytes=1)
    assert sum(fp16.values()) < 0.7 * sum(fp32.values())
    leaves = flatten(read_msgpack(tmp_path / "fp16" / "dalle-embedded" / "flax_model.msgpack"))
    assert {np.asarray(v).dtype for v in leaves.values()} == {np.dtype(np.float16)}
    assert {v.dtype for v in read_safetensors(tmp_path / "fp16" / "clip-embedded" / "model.safetensors").values()} \
        == {np.dtype(np.float16)}
    load_dallebart(tmp_path / "fp16" / "dalle-embedded")
    load_clip(tmp_path / "fp16" / "clip-embedded")
    codes = np.arange(2 * 64).reshape(2, 64) % 32
    a = np.asarray(load_vqgan(tmp_path / "fp32" / "vqgan-embedded").decode(codes))
    b = np.asarray(load_vqgan(tmp_path / "fp16" / "vqgan-embedded").decode(codes))
    np.testing.assert_allclose(a, b, atol=0.05)


def test_a_small_budget_eaten_by_compilation_still_trains(tmp_path: Path) -> None:
    """The first step (compilation) takes longer than the whole budget: the phase must still
    plan and run real steps, not stop after one (what a GPU run with a 30 s phase budget did)."""
    import time

    import optax

    from dalle_app.train.common import PhaseLog, make_optimizer, run_loop, start_state

    optim = OptimConfig(lr=1e-3, warmup=5)
    tx = make_optimizer(optim)
    params = {"w": np.zeros(3, np.float32)}
    calls = []

    def step_fn(state: dict, step: int) -> tuple[dict, dict]:
        time.sleep(0.3 if not calls else 0.001)  # a slow "compile", then fast steps
        calls.append(step)
        grads = {"w": np.ones(3, np.float32)}
        updates, state["opt_state"] = tx.update(grads, state["opt_state"], state["params"])
        state["params"] = optax.apply_updates(state["params"], updates)
        return state, {"loss": np.float32(1.0 / (step + 1))}

    log = PhaseLog(tmp_path, "test")
    state = start_state(tmp_path, log, params, tx, steps=None, seconds=0.2)
    t0 = time.time()
    state = run_loop(tmp_path, log, state, step_fn, optim, save_every=1000, log_every=10, seconds=0.2,
                     deadline=t0 + 0.2 * 1.15, min_steps=30)
    assert state["step"] >= 30 and state["total_steps"] >= 30
    assert (tmp_path / "state.msgpack").is_file()


@pytest.mark.slow
def test_decoder_finetuning_keeps_every_code(tiny_run: tuple[Path, Path]) -> None:
    from dalle_app.models.vqgan import load_vqgan
    from dalle_app.models.weights import flatten

    out = tiny_run[0]
    before, after = load_vqgan(out / "vqgan" / "model"), load_vqgan(out / "vqgan-decoder" / "model")
    images = data_batch(5, 4, "heldout").images.astype(np.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(before.encode(images)[0]), np.asarray(after.encode(images)[0]))
    a, b = flatten(before.params), flatten(after.params)
    assert all(np.array_equal(a[k], b[k]) for k in a if not k.startswith(("decoder", "post_quant_conv")))
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("decoder"))


def test_decoder_positions_train_as_rows_plus_columns_and_export_as_one_table() -> None:
    import jax

    from dalle_app.models.dallebart import DalleBart
    from dalle_app.models.weights import flatten
    from dalle_app.train.dallebart_training import model_config, to_grid_positions, with_position_table
    from dalle_app.train.profiles import PROFILES

    vq = PROFILES["tiny"].vqgan_model
    config = model_config(vq, 300, 16, d_model=32, encoder_layers=1, decoder_layers=1, heads=2)
    text = np.ones((1, 16), np.int32)
    params = DalleBart(config).init(jax.random.PRNGKey(0), text, text, np.ones((1, config.image_length), np.int32))["params"]
    side = vq.latent_size
    trained = to_grid_positions(params, side, jax.random.PRNGKey(1))
    positions = trained["model"]["decoder"]["embed_positions"]
    assert set(positions) == {"rows", "columns"} and positions["rows"].shape == (side, 32)

    table = with_position_table(trained)
    # Same tree as the published layout, so save/load and the app's model class are unchanged.
    assert {k: v.shape for k, v in flatten(table).items()} == {k: v.shape for k, v in flatten(params).items()}
    embedding = np.asarray(table["model"]["decoder"]["embed_positions"]["embedding"])
    r, c = 3, 5  # code r*side+c sits at row r, column c of the code grid
    np.testing.assert_allclose(embedding[r * side + c], positions["rows"][r] + positions["columns"][c], rtol=1e-6)
    assert 0.5 < embedding.std() / np.asarray(params["model"]["decoder"]["embed_positions"]["embedding"]).std() < 2
    assert with_position_table(params) is params
    with pytest.raises(ValueError, match="not a 7x7 grid"):
        to_grid_positions(params, 7, jax.random.PRNGKey(1))


@pytest.mark.slow
def test_outline_finetunes_start_from_dallebart_and_ship_their_average(tiny_run: tuple[Path, Path]) -> None:
    """`all` fine-tunes DalleBart's final state twice (tiny profile) on different batches and ships
    base_share · start + the rest shared evenly by the fine-tunes."""
    from dalle_app.models.dallebart import load_dallebart
    from dalle_app.models.weights import flatten

    out, assets = tiny_run
    folder = out / "dallebart-outline"
    report = json.loads((folder / "report.json").read_text())
    base_report = json.loads((out / "dallebart" / "report.json").read_text())
    assert report["steps"] == 4 and report["outline_weight"] == 4.0
    assert report["finetunes"] == 2 and report["base_share"] == 0.5
    assert report["before_eval_loss"] == pytest.approx(base_report["eval_loss"], rel=1e-4)  # DalleBart's final state
    base = load_dallebart(out / "dallebart" / "model")
    runs = [load_dallebart(folder / f"run{k}" / "model") for k in range(2)]
    mixed, shipped = load_dallebart(folder / "model"), load_dallebart(assets / "dalle-embedded")
    a, r0, r1, m, c = (flatten(x.params) for x in (base, *runs, mixed, shipped))
    assert a.keys() == r0.keys() == m.keys() == c.keys() and mixed.config == base.config
    assert any(not np.array_equal(a[k], r0[k]) for k in a)  # the fine-tunes moved the weights...
    assert any(not np.array_equal(r0[k], r1[k]) for k in a)  # ...each its own way
    for k in a:
        np.testing.assert_allclose(m[k], 0.5 * a[k] + 0.25 * r0[k] + 0.25 * r1[k], rtol=1e-5, atol=1e-6)
        assert np.array_equal(m[k], c[k])  # export ships the average


def test_weight_average_needs_shares_that_add_up_to_one() -> None:
    from dalle_app.train.dallebart_outline import weight_average

    trees = [{"w": np.array([0.0, 2.0])}, {"w": np.array([4.0, 6.0])}]
    assert weight_average(trees, [0.25, 0.75])["w"].tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="add up to 1"):
        weight_average(trees, [0.5, 0.6])


def test_outline_weights_mark_codes_unlike_the_one_above_and_leave_the_reported_loss_plain() -> None:
    import jax
    import jax.numpy as jnp

    from dalle_app.models.dallebart import DalleBart
    from dalle_app.train.dallebart_training import code_weights, make_loss, model_config
    from dalle_app.train.profiles import PROFILES

    grid = np.zeros((1, 4, 4), np.int32)
    grid[0, 1, 2] = grid[0, 2, 2] = 7  # a two-code column: it starts at row 1 and ends before row 3
    w = np.asarray(code_weights(jnp.asarray(grid.reshape(1, 16)), 4, 4.0)).reshape(4, 4)
    assert np.isclose(w.mean(), 1.0)
    marked = w > w.min()
    assert np.argwhere(marked).tolist() == [[1, 2], [3, 2]]  # the column's start and the code after its end
    assert np.isclose(w[1, 2] / w[0, 0], 5.0)

    vq = PROFILES["tiny"].vqgan_model
    config = model_config(vq, 300, 16, d_model=32, encoder_layers=1, decoder_layers=1, heads=2)
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(3, 300, (2, 16)), jnp.int32),
             "attention_mask": jnp.ones((2, 16), jnp.int32),
             "codes": jnp.asarray(rng.integers(0, vq.n_embed, (2, config.image_length)), jnp.int32)}
    module = DalleBart(config)
    params = module.init(jax.random.PRNGKey(0), batch["input_ids"], batch["attention_mask"], batch["codes"])["params"]
    plain_loss, plain = make_loss(module)(params, batch)
    weighted_loss, weighted = make_loss(module, 4.0)(params, batch)
    assert float(weighted["loss"]) == float(plain["loss"]) == float(plain_loss)  # metrics stay comparable
    assert float(weighted_loss) != float(plain_loss)


def test_resuming_a_state_of_other_settings_says_what_to_do(tmp_path: Path) -> None:
    from dalle_app.train.common import load_state, save_state

    save_state(tmp_path / "state.msgpack", {"step": 3, "params": {"embedding": np.zeros((4, 2), np.float32)}})
    other = {"step": 0, "params": {"rows": np.zeros((2, 2), np.float32), "columns": np.zeros((2, 2), np.float32)}}
    with pytest.raises(ValueError, match="new --out folder"):
        load_state(tmp_path / "state.msgpack", other)
