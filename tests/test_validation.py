"""validation.py: every parameter accepted, cleaned with a notice, or rejected saying what is allowed."""

from __future__ import annotations

import math

import pytest

from dalle_app.validation import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    NUMBERS,
    ValidationError,
    check_number,
    clean_text,
    sampling_defaults,
    validate_request,
)
from dalle_app.request import DEFAULT_SAMPLING, GenerationRequest, SamplingSettings

MODELS = {"embedded": None, "mini": None, "mega": "not downloaded, offline"}


def validate(**kwargs):
    kwargs.setdefault("prompt", "a red square above a blue circle")
    return validate_request(models=MODELS, default_model="embedded", draw_seed=lambda: 1234, **kwargs)


def test_defaults_are_the_original_ones():
    r = validate()
    assert isinstance(r, GenerationRequest)
    assert (r.model, r.num_images, r.seed, r.sampling) == ("embedded", 9, 1234, SamplingSettings(1.0, 50, 1.0, 10.0))
    assert r.sampling == DEFAULT_SAMPLING and r.notices == ()
    assert r.parameters() == {
        "prompt": "a red square above a blue circle", "negative_prompt": "", "model": "embedded",
        "num_images": 9, "seed": 1234, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "cond_scale": 10.0,
        "seamless": False,
    }


@pytest.mark.parametrize(("value", "expected"), [(None, False), (False, False), (True, True), (0, False), (1, True)])
def test_seamless_is_a_yes_or_no(value, expected):
    assert validate(seamless=value).seamless is expected


@pytest.mark.parametrize("value", ["true", 2, math.nan, [True], 0.5])
def test_seamless_refuses_anything_else(value):
    with pytest.raises(ValidationError, match="seamless must be true or false"):
        validate(seamless=value)


def test_left_out_sampling_settings_take_the_models_recommended_ones():
    recommended = {"embedded": {"cond_scale": 3.0, "top_k": 8}, "mini": {}}
    r = validate(recommended=recommended)
    assert r.sampling == SamplingSettings(temperature=1.0, top_k=8, top_p=1.0, cond_scale=3.0)
    assert validate(recommended=recommended, cond_scale=12).sampling.cond_scale == 12.0  # given wins
    assert validate(recommended=recommended, model="mini").sampling.cond_scale == 10.0


def test_recommendations_outside_the_ranges_are_ignored():
    assert sampling_defaults({"cond_scale": 99, "top_k": 0, "temperature": 0.5, "other": 1}) == SamplingSettings(
        temperature=0.5, top_k=50, top_p=1.0, cond_scale=10.0)


def test_good_values_pass_through_with_their_types():
    r = validate(num_images=4.0, seed=7, temperature=0.5, top_k=128, top_p=0.9, cond_scale=3, model="mini")
    assert (r.num_images, r.seed, r.sampling.top_k) == (4, 7, 128)
    assert isinstance(r.num_images, int) and isinstance(r.sampling.top_k, int)
    assert isinstance(r.sampling.cond_scale, float)
    assert r.model == "mini"


def test_seed_minus_one_and_none_are_random():
    assert validate(seed=-1).seed == 1234
    assert validate(seed=None).seed == 1234
    assert validate(seed=0).seed == 0
    assert validate(seed=MAX_SEED).seed == MAX_SEED


BAD_NUMBERS = [
    ("num_images", 0, "from 1 to 16"),
    ("num_images", -3, "from 1 to 16"),
    ("num_images", 17, "from 1 to 16"),
    ("num_images", 10**12, "from 1 to 16"),
    ("num_images", 2.5, "not a whole number"),
    ("num_images", math.nan, "nan"),
    ("num_images", math.inf, "inf"),
    ("num_images", "9", "got str"),
    ("num_images", [9], "got list"),
    ("num_images", True, "got bool"),
    ("temperature", 0, "greater than 0"),
    ("temperature", -1.0, "greater than 0"),
    ("temperature", math.nan, "nan"),
    ("temperature", -math.inf, "-inf"),
    ("temperature", 1e308, "at most 5"),
    ("temperature", "hot", "got str"),
    ("top_k", 0, "from 1 to 16384"),
    ("top_k", 3.5, "not a whole number"),
    ("top_k", 10**30, "from 1 to 16384"),
    ("top_k", {"k": 1}, "got dict"),
    ("top_p", 0.0, "greater than 0"),
    ("top_p", 1.5, "at most 1"),
    ("top_p", math.nan, "nan"),
    ("cond_scale", 0, "from 1 to 30"),
    ("cond_scale", -10, "from 1 to 30"),
    ("cond_scale", 1e9, "from 1 to 30"),
    ("cond_scale", math.inf, "inf"),
    ("seed", -2, "-1 (random)"),
    ("seed", 2**31, "-1 (random)"),
    ("seed", 10**40, "-1 (random)"),
    ("seed", 1.5, "-1 (random)"),
    ("seed", math.nan, "-1 (random)"),
    ("seed", "42", "got str"),
    ("seed", [1, 2], "got list"),
]


@pytest.mark.parametrize("name,value,expected", BAD_NUMBERS)
def test_bad_numbers_are_rejected_saying_what_is_allowed(name, value, expected):
    with pytest.raises(ValidationError) as info:
        validate(**{name: value})
    message = str(info.value)
    assert name in message and expected in message


@pytest.mark.parametrize("name", list(NUMBERS))
def test_numeric_none_means_default(name):
    spec = NUMBERS[name]
    assert check_number(None, spec) == spec.default


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("", "Please enter a prompt"),
        ("   \t\n ", "Please enter a prompt"),
        ("\x00\x01\x7f", "Please enter a prompt"),
        (None, "Please enter a prompt"),
        ("\ud800", "Please enter a prompt"),
        ("!!! ???", "at least one letter or digit"),
        (42, "must be text"),
        (["a", "b"], "must be text"),
    ],
)
def test_bad_prompts_are_rejected(prompt, expected):
    with pytest.raises(ValidationError, match=expected):
        validate(prompt=prompt)


def test_control_characters_and_nul_are_removed_with_a_notice():
    r = validate(prompt="a red\x00 square\x1b[31m\u202e above")
    assert r.prompt == "a red square[31m above"
    assert any("control character" in n for n in r.notices)


def test_newlines_and_tabs_become_spaces_silently():
    r = validate(prompt="a red\n\tsquare  ")
    assert r.prompt == "a red square" and r.notices == ()


def test_lone_surrogates_are_dropped_and_pairs_joined():
    r = validate(prompt="a red square \ud83d\ude00 \udc00")
    assert r.prompt == "a red square \U0001F600"
    assert any("surrogate" in n for n in r.notices)


def test_emoji_only_prompt_is_spelled_out():
    r = validate(prompt="🥑🪑")
    assert r.prompt == "avocado chair"
    assert any("only emoji" in n for n in r.notices)


def test_right_to_left_text_is_accepted_with_a_notice():
    r = validate(prompt="مربع أحمر")
    assert r.prompt == "مربع أحمر"
    assert any("right-to-left" in n for n in r.notices)


def test_very_long_prompt_is_cut_with_a_notice():
    r = validate(prompt="red square " * 500)
    assert len(r.prompt) <= MAX_PROMPT_CHARS
    assert any(str(MAX_PROMPT_CHARS) in n for n in r.notices)


def test_negative_prompt_is_optional_and_cleaned():
    assert validate(negative_prompt=None).negative_prompt == ""
    r = validate(negative_prompt=" blurry\x00 ")
    assert r.negative_prompt == "blurry" and any("negative prompt" in n for n in r.notices)
    with pytest.raises(ValidationError, match="negative prompt must be text"):
        validate(negative_prompt=3)


@pytest.mark.parametrize(
    "model,expected",
    [
        ("mega", "cannot be used here (not downloaded, offline)"),
        ("/etc/passwd", "Unknown model"),
        ("dalle-mini/dalle-mini", "Unknown model"),
        ("../assets/dalle-embedded", "Unknown model"),
        (3, "model must be one of"),
        (["mini"], "model must be one of"),
    ],
)
def test_only_usable_configured_models_are_accepted(model, expected):
    with pytest.raises(ValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate(model=model)


def test_missing_model_means_the_default():
    assert validate(model=None).model == "embedded"
    assert validate(model="").model == "embedded"


def test_clean_text_reports_what_changed():
    text, notices = clean_text("  fine  ", "prompt", required=True)
    assert (text, notices) == ("fine", [])
