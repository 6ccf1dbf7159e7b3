"""The sampler: warpers keep exactly the right tokens, the cached loop equals teacher forcing,
greedy decoding reproduces dalle-mini 0.1.5, a seed fixes an image whatever the batch, and a
forced prefix is kept and leaves the image independent of the batch."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_app import runtime
from dalle_app.models.dallebart import DalleBartModel, load_dallebart
from dalle_app.sampling import (
    Sampler, bucket_size, filter_logits, guide, guided_hidden, image_seed, prefill_length, sample,
    sample_filtered,
)

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
FOLDERS = ["dallebart_tiny_a", "dallebart_tiny_b_scanned"]
TIE_MARGIN = 1e-4

runtime.configure(cache_dir=False)  # pin the RNG implementation; no compilation cache in tests


@functools.lru_cache(maxsize=None)
def _model(name: str, dtype: str = "float32") -> DalleBartModel:
    return load_dallebart(REFERENCE / name, runtime.resolve_dtype(dtype))


@functools.lru_cache(maxsize=None)
def _expected(name: str) -> dict[str, np.ndarray]:
    with np.load(REFERENCE / name / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@functools.lru_cache(maxsize=None)
def _sampler(name: str, dtype: str = "float32") -> Sampler:
    return Sampler(_model(name, dtype))


def _generate(name: str, rows: list[int], seeds: list[int], dtype: str = "float32", pad_to: int = 16,
              prefixes: list[np.ndarray] | None = None, wrap: list[bool] | None = None,
              **settings) -> np.ndarray:
    """Sample for the fixture prompts `rows` (cond = prompt, uncond = the empty string), padded
    to `pad_to` rows (one compiled program for most tests) with extra rows that are dropped.
    `prefixes`: each row's forced first codes (empty for plain generation); padding rows are
    plain. `wrap`: each row's tileable flag (padding rows are not)."""
    exp, sampler = _expected(name), _sampler(name, dtype)
    count = len(rows)
    pad = max(pad_to - count, 0)
    rows, seeds = list(rows) + [0] * pad, list(seeds) + list(range(pad))
    n = len(rows)
    ids = np.concatenate([exp["input_ids"], exp["input_ids_uncond"][:1]])
    mask = np.concatenate([exp["attention_mask"], exp["attention_mask_uncond"][:1]])
    cross = sampler.encode_texts(ids, mask)
    full = lambda key, default, dt: np.full(n, settings.get(key, default), dt)
    forced = {}
    if prefixes is not None:
        prefix_codes = np.zeros((n, sampler.image_length), np.int32)
        prefix_length = np.zeros(n, np.int32)
        for i, prefix in enumerate(prefixes):
            prefix_codes[i, :len(prefix)], prefix_length[i] = prefix, len(prefix)
        forced = dict(prefix_codes=prefix_codes, prefix_length=prefix_length)
    if wrap is not None:
        forced["wrap"] = np.array(list(wrap) + [False] * pad, bool)
    return sampler.generate(
        cross, mask, np.array(rows, np.int32), np.full(n, len(ids) - 1, np.int32),
        np.array(seeds), full("temperature", 1.0, np.float32), full("top_k", 50, np.int32),
        full("top_p", 1.0, np.float32), full("cond_scale", 10.0, np.float32), **forced)[:count]


# ---- warpers --------------------------------------------------------------------------------


def _reference_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float, num_codes: int) -> set[int]:
    """The kept token set, computed the slow obvious way (float64)."""
    scores = logits.astype(np.float64).copy()
    scores[num_codes:] = -np.inf
    scores /= temperature
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = order[:top_k] if top_k > 0 else order
    kept = [i for i in kept if np.isfinite(scores[i])]
    if top_p < 1.0:
        probs = np.exp(scores[kept] - scores[kept].max())
        probs /= probs.sum()
        cumulative, chosen = 0.0, []
        for i, p in zip(kept, probs):
            if chosen and cumulative >= top_p:
                break
            chosen.append(i)
            cumulative += p
        kept = chosen
    return set(kept)


@pytest.mark.parametrize("top_k,top_p,temperature", [
    (50, 1.0, 1.0), (1, 1.0, 1.0), (0, 1.0, 1.0), (0, 0.9, 1.0), (20, 0.5, 0.7), (7, 0.3, 2.5),
    (0, 0.01, 1.0), (300, 0.95, 1.3),
])
def test_filter_keeps_exactly_the_right_tokens(top_k: int, top_p: float, temperature: float) -> None:
    rng = np.random.default_rng(top_k + int(100 * top_p))
    vocab, num_codes = 257, 256
    logits = (rng.normal(size=(4, vocab)) * 3).astype(np.float32)
    logits[:, -1] = 100.0  # a huge non-image id must never survive
    out = np.asarray(filter_logits(jnp.asarray(logits), jnp.full(4, temperature), jnp.full(4, top_k, jnp.int32),
                                   jnp.full(4, top_p), num_codes))
    for row in range(4):
        kept = set(np.flatnonzero(np.isfinite(out[row])).tolist())
        assert kept == _reference_filter(logits[row], temperature, top_k, top_p, num_codes)
        idx = sorted(kept)
        np.testing.assert_allclose(out[row, idx], logits[row, idx] / np.float32(temperature), rtol=1e-6)


def test_filter_settings_are_per_row() -> None:
    """One call, rows with different settings, equals each row filtered alone."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 100)).astype(np.float32) * 4)
    temperature, top_k, top_p = jnp.array([1.0, 0.5, 2.0]), jnp.array([5, 0, 40]), jnp.array([1.0, 0.6, 0.8])
    together = np.asarray(filter_logits(logits, temperature, top_k, top_p, 100))
    for row in range(3):
        alone = filter_logits(logits[row:row + 1], temperature[row:row + 1], top_k[row:row + 1],
                              top_p[row:row + 1], 100)
        np.testing.assert_array_equal(together[row], np.asarray(alone)[0])


@pytest.mark.parametrize("top_k", [[50, 50, 1, 256], [0, 50, 5, 3], [300, 10, 10, 10]])
def test_fast_sampling_draws_the_same_tokens(top_k: list[int]) -> None:
    """The top-k shortcut (all rows' top_k ≤ 256) and the full sort draw the same tokens as
    sampling from the filtered logits, row by row."""
    rng = np.random.default_rng(sum(top_k))
    logits = jnp.asarray(rng.normal(size=(4, 1001)).astype(np.float32) * 3)
    temperature, top_p = jnp.array([1.0, 0.8, 1.5, 1.0]), jnp.array([1.0, 0.9, 0.5, 0.7])
    k = jnp.array(top_k, jnp.int32)
    for seed in range(5):
        keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4, dtype=jnp.uint32) + 10 * seed)
        want = sample(keys, filter_logits(logits, temperature, k, top_p, 1000))
        np.testing.assert_array_equal(sample_filtered(keys, logits, temperature, k, top_p, 1000), want)


def test_guidance_and_sampling_stay_on_image_codes() -> None:
    cond, uncond = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(guide(cond, uncond, jnp.array([10.0])), [[1.0, 11.0, 21.0]])
    logits = filter_logits(jnp.zeros((64, 9)), jnp.ones(64), jnp.zeros(64, jnp.int32), jnp.ones(64), 8)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(64, dtype=jnp.uint32))
    drawn = np.asarray(sample(keys, logits))
    assert drawn.max() < 8 and len(set(drawn.tolist())) > 4


def test_seeds_and_buckets() -> None:
    assert [image_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert image_seed(2**31 - 1, 1) == 0
    assert bucket_size(1, (1, 2, 4, 9, 16)) == 1
    assert bucket_size(5, (1, 2, 4, 9, 16)) == 9
    assert bucket_size(5, (1, 2, 4, 9, 16), multiple=2) == 10
    assert bucket_size(40, (1, 2, 4, 9, 16)) == 48
    assert [prefill_length(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert prefill_length(200, 256) == 256


# ---- the model loop -------------------------------------------------------------------------


def _stepwise_logits(name: str, dtype: str = "float32") -> np.ndarray:
    """Teacher-forced logits through the sampler's cached decoder step (the model's
    decode_hidden, guidance on hidden states, then logits), one position at a time (each row
    paired with itself as its unconditional row, guidance scale 1)."""
    exp, m = _expected(name), _model(name, dtype)
    ids = np.repeat(exp["decoder_input_ids"], 2, axis=0)
    mask = np.repeat(exp["attention_mask"], 2, axis=0)
    hidden = m.encode(m.params, np.repeat(exp["input_ids"], 2, axis=0), mask)
    cross = m.cross_kv(m.params, hidden)
    cache = m.init_cache(ids.shape[0])
    scale = jnp.ones(ids.shape[0] // 2)

    @jax.jit
    def step(tokens, position, cache):
        h, cache = m.decode_hidden(m.params, tokens, position, cache, cross, mask)
        return m.logits(m.params, guided_hidden(h, scale)), cache

    logits = []
    for t in range(ids.shape[1]):
        out, cache = step(jnp.asarray(ids[:, t]), jnp.int32(t), cache)
        assert out.dtype == jnp.float32
        logits.append(np.asarray(out))
    return np.stack(logits, 1)


@pytest.mark.parametrize("name", FOLDERS)
def test_kv_cache_steps_equal_teacher_forced_logits(name: str) -> None:
    """The sampler's KV-cached decoder step (unrolled layers, head-major per-layer caches)
    gives dalle-mini's teacher-forced logits, position by position."""
    np.testing.assert_allclose(_stepwise_logits(name), _expected(name)["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FOLDERS)
def test_sampled_codes_agree_with_teacher_forcing(name: str) -> None:
    """The compiled loop's greedy choices are the argmax of teacher-forced logits on its own
    output: the cache, positions and token feeding inside the loop are right."""
    exp, m = _expected(name), _model(name)
    codes = _generate(name, list(range(4)), [0] * 4, top_k=1, cond_scale=1.0)
    bos = np.full((4, 1), m.config.decoder_start_token_id, np.int32)
    hidden = m.encode(m.params, exp["input_ids"][:4], exp["attention_mask"][:4])
    logits = np.asarray(m.decode(m.params, np.concatenate([bos, codes[:, :-1]], 1), hidden,
                                 exp["attention_mask"][:4]))[..., :m.config.image_vocab_size]
    top2 = np.sort(logits, -1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] >= TIE_MARGIN
    np.testing.assert_array_equal(logits.argmax(-1)[decided], codes[decided])


@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("scale", [1, 3])
def test_top_k_1_reproduces_reference_greedy(name: str, scale: int) -> None:
    """top_k=1 is greedy: the codes equal dalle-mini 0.1.5's, except after a near-tie step."""
    exp = _expected(name)
    want, margin = exp[f"greedy_cond{scale}"], exp[f"margin_cond{scale}"]
    rows = list(range(len(want)))
    got = _generate(name, rows, rows, top_k=1, cond_scale=float(scale), temperature=0.5)
    for row in rows:
        diff = np.flatnonzero(got[row] != want[row])
        if len(diff):  # the first difference may only come from a tie within float rounding
            assert margin[row, diff[0]] < TIE_MARGIN, (row, diff[0], margin[row, diff[0]])


def test_same_seed_same_image_whatever_the_batch() -> None:
    name = "dallebart_tiny_a"
    alone = _generate(name, [3], [1234], pad_to=1)
    batch = _generate(name, [0, 3, 5, 3, 3], [1, 1234, 7, 99, 1234], top_p=0.9, pad_to=5)[[1, 4]]
    mixed = _generate(name, [5, 3, 1, 2], [8, 1234, 5, 6], top_k=10)
    np.testing.assert_array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(_generate(name, [3], [1234])[0], alone[0])  # 1 row vs 16 rows
    assert not np.array_equal(_generate(name, [3], [1235])[0], alone[0])
    # settings are per row, so check the row of `mixed` against its own settings alone
    np.testing.assert_array_equal(_generate(name, [3], [1234], top_k=10)[0], mixed[1])
    np.testing.assert_array_equal(_generate(name, [3], [1234], top_p=0.9, pad_to=1)[0], batch[0])


def test_chunked_progress_gives_the_same_codes() -> None:
    name = "dallebart_tiny_a"
    sampler, exp = _sampler(name), _expected(name)
    ids = np.concatenate([exp["input_ids"][:2], exp["input_ids_uncond"][:1]])
    mask = np.concatenate([exp["attention_mask"][:2], exp["attention_mask_uncond"][:1]])
    cross = sampler.encode_texts(ids, mask)
    args = (cross, mask, np.array([0, 1]), np.array([2, 2]), np.array([4, 5]),
            np.ones(2, np.float32), np.full(2, 50), np.ones(2, np.float32), np.full(2, 10.0, np.float32))
    seen = []
    chunked = sampler.generate(*args, progress=lambda s, t, c: seen.append((s, t, c.shape)), progress_every=5)
    np.testing.assert_array_equal(chunked, sampler.generate(*args))
    length = sampler.image_length
    assert seen == [(s, length, (2, s)) for s in (5, 10, 15)] + [(length, length, (2, length))]


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.25), ("float16", 0.05)])
def test_half_precision_stays_close_to_float32(dtype: str, tolerance: float) -> None:
    """Logits through the cached loop in bf16/fp16 stay near the fp32 reference, and sampling
    in those dtypes runs (logits and sampling are float32 inside)."""
    name = "dallebart_tiny_b_scanned"
    exp, m = _expected(name), _model(name, dtype)
    err = np.abs(_stepwise_logits(name, dtype) - exp["logits"]).max() / exp["logits"].std()
    assert err < tolerance, f"{dtype} logits off by {err:.3g} standard deviations"
    codes = _generate(name, [0, 1], [3, 4], dtype=dtype)
    assert codes.shape == (2, m.config.image_length) and codes.max() < m.config.image_vocab_size
    greedy = _generate(name, list(range(14)), [0] * 14, dtype=dtype, top_k=1, cond_scale=1.0)
    agree = (greedy == exp["greedy_cond1"]).mean()
    assert agree > 0.5, f"{dtype} greedy codes agree with float32 on only {agree:.0%} of the steps"


# ---- forced prefixes (image completion) -----------------------------------------------------


COLD = 0.05
"""Temperature of the prefix tests: the tiny fixture's logits are nearly flat, so at 1.0 the
draws would hardly depend on the codes before them; colder, they follow the context."""


def _complete(rows: list[int], seeds: list[int], prefixes: list[np.ndarray] | None, pad_to: int) -> np.ndarray:
    return _generate("dallebart_tiny_a", rows, seeds, pad_to=pad_to, prefixes=prefixes, temperature=COLD)


def _prefixes(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    num_codes = _model("dallebart_tiny_a").config.image_vocab_size
    return [rng.integers(0, num_codes, n).astype(np.int32) for n in lengths]


def test_forced_prefix_is_kept_exactly() -> None:
    prefixes = _prefixes([0, 5, 16, 3, 1])
    codes = _complete([0, 1, 2, 3, 4], [10, 11, 12, 13, 14], prefixes, pad_to=5)
    for row, prefix in enumerate(prefixes):
        np.testing.assert_array_equal(codes[row, :len(prefix)], prefix)
    # what follows depends on the prefix: another prefix, another continuation
    other = _complete([1], [11], _prefixes([5], seed=1), pad_to=5)
    assert not np.array_equal(other[0, 5:], codes[1, 5:])


def test_prefix_of_an_image_own_codes_gives_the_same_image() -> None:
    """A row's key is split once per position, forced or sampled: forcing the first codes of
    a plain image reproduces that image, through the one-pass prefill and step by step."""
    plain = _complete([2, 4], [21, 22], None, pad_to=2)
    for cut in (1, 6, 11):
        same = _complete([2, 4], [21, 22], [plain[0, :cut], plain[1, :cut]], pad_to=2)
        np.testing.assert_array_equal(same, plain)
    mixed = _complete([2, 4], [21, 22], [plain[0, :7], plain[1, :0]], pad_to=2)
    np.testing.assert_array_equal(mixed, plain)


def test_completion_batched_with_plain_rows_equals_alone() -> None:
    """A completion row gives the same codes alone (its prefix prefilled in one pass) and
    batched with plain rows (prefix forced step by step); the plain rows are unchanged."""
    prefix = _prefixes([6], seed=2)[0]
    alone = _complete([3], [1234], [prefix], pad_to=1)
    batch = _complete([0, 3, 5], [1, 1234, 7], [prefix[:0], prefix, prefix[:0]], pad_to=4)
    np.testing.assert_array_equal(batch[1], alone[0])
    np.testing.assert_array_equal(batch[[0, 2]], _complete([0, 5], [1, 7], None, pad_to=4))


def test_prefill_in_one_pass_equals_forcing_step_by_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose prefixes all cover the first 7 positions: that common part filled in one
    multi-position pass gives the same codes as forcing every position inside the loop."""
    sampler = _sampler("dallebart_tiny_a", "float32")  # the instance _generate uses
    calls = []
    prefill = sampler._prefill
    monkeypatch.setattr(sampler, "_prefill", lambda *args: calls.append(int(args[-1])) or prefill(*args))
    prefixes = _prefixes([7, 10, 13, 7], seed=3)
    rows, seeds = [0, 1, 2, 3], [5, 6, 7, 8]
    one_pass = _complete(rows, seeds, prefixes, pad_to=4)
    assert calls == [7]
    step_by_step = _complete(rows + [4], seeds + [9], prefixes + [prefixes[0][:0]], pad_to=5)
    assert calls == [7]  # a plain row in the batch: no common prefix, nothing prefilled
    np.testing.assert_array_equal(one_pass, step_by_step[:4])


def test_greedy_completion_agrees_with_teacher_forcing() -> None:
    """After a prefilled prefix, greedy choices are the argmax of teacher-forced logits: the
    prefill leaves the cache as the loop would."""
    name = "dallebart_tiny_a"
    exp, m = _expected(name), _model(name)
    prefixes = _prefixes([9, 9, 12, 9], seed=4)
    codes = _generate(name, [0, 1, 2, 3], [0] * 4, pad_to=4, prefixes=prefixes, top_k=1, cond_scale=1.0)
    bos = np.full((4, 1), m.config.decoder_start_token_id, np.int32)
    hidden = m.encode(m.params, exp["input_ids"][:4], exp["attention_mask"][:4])
    logits = np.asarray(m.decode(m.params, np.concatenate([bos, codes[:, :-1]], 1), hidden,
                                 exp["attention_mask"][:4]))[..., :m.config.image_vocab_size]
    top2 = np.sort(logits, -1)[..., -2:]
    decided = (top2[..., 1] - top2[..., 0] >= TIE_MARGIN) & (np.arange(codes.shape[1]) >= 12)
    assert decided.sum() > 4
    np.testing.assert_array_equal(logits.argmax(-1)[decided], codes[decided])


def test_tileable_rows_wrap_their_grid_and_batch_with_plain_rows() -> None:
    """A tileable row's last column repeats its first and its last row the first; everything
    before the last column and row is drawn as for a plain row with the same seed; the row
    gives the same codes alone and batched with plain rows, which stay unchanged."""
    side = _sampler("dallebart_tiny_a").side
    plain = _generate("dallebart_tiny_a", [0, 2, 5], [3, 4, 5], pad_to=4)
    tiled = _generate("dallebart_tiny_a", [0, 2, 5], [3, 4, 5], pad_to=4, wrap=[False, True, False])
    np.testing.assert_array_equal(tiled[[0, 2]], plain[[0, 2]])
    grid, plain_grid = tiled[1].reshape(side, side), plain[1].reshape(side, side)
    np.testing.assert_array_equal(grid[:, -1], grid[:, 0])
    np.testing.assert_array_equal(grid[-1], grid[0])
    np.testing.assert_array_equal(grid[0, :-1], plain_grid[0, :-1])  # nothing copied yet
    assert not np.array_equal(grid, plain_grid)
    alone = _generate("dallebart_tiny_a", [2], [4], pad_to=1, wrap=[True])
    np.testing.assert_array_equal(alone[0], tiled[1])


def test_tileable_completion_keeps_its_prefix() -> None:
    """A forced prefix wins over the wrap: the kept codes stay, the rest wraps around them (the
    last row copies the first, kept as it is)."""
    side = _sampler("dallebart_tiny_a").side
    prefix = _prefixes([side + 2], seed=5)[0]
    codes = _generate("dallebart_tiny_a", [1], [8], pad_to=1, prefixes=[prefix], wrap=[True])[0]
    np.testing.assert_array_equal(codes[:len(prefix)], prefix)
    grid = codes.reshape(side, side)
    np.testing.assert_array_equal(grid[1:-1, -1], grid[1:-1, 0])
    np.testing.assert_array_equal(grid[-1], grid[0])


@pytest.mark.parametrize(("codes", "length", "message"), [
    (np.zeros((2, 16)), np.array([3, 17]), "between 0 and 16"),
    (np.zeros((2, 16)), np.array([3, -1]), "between 0 and 16"),
    (np.full((2, 16), 64), np.array([0, 2]), r"image codes in \[0, 64\)"),
    (np.zeros((2, 15)), np.array([1, 1]), "must be"),
    (np.zeros((2, 16)), None, "both"),
])
def test_bad_prefix_is_refused(codes: np.ndarray, length: np.ndarray | None, message: str) -> None:
    name = "dallebart_tiny_a"
    sampler, exp = _sampler(name), _expected(name)
    mask = exp["attention_mask"][:2]
    cross = sampler.encode_texts(exp["input_ids"][:2], mask)
    with pytest.raises(ValueError, match=message):
        sampler.generate(cross, mask, np.array([0, 1]), np.array([1, 1]), np.array([0, 1]), np.ones(2),
                         np.full(2, 50), np.ones(2), np.ones(2), prefix_codes=codes, prefix_length=length)
