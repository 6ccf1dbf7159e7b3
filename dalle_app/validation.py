"""Every user-supplied generation parameter is checked here, and only here.

The UI, the HTTP API and the CLI all pass their raw values through `validate_request`, so a
value is accepted, cleaned (with a notice the user sees) or rejected with a message that says
what is allowed, the same way whichever door it came in by. Values arrive from JSON (the API
runs with Gradio's preprocessing off), so anything may show up: None, strings for numbers,
lists, NaN, lone UTF-16 surrogates from browsers.
"""

from __future__ import annotations

import math
import numbers
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import emoji

from dalle_app.request import (
    DEFAULT_NUM_IMAGES,
    DEFAULT_SAMPLING,
    LOCAL_CLIENT,
    MAX_SEED,
    RANDOM_SEED,
    SAMPLING_FIELDS,
    GenerationRequest,
    SamplingSettings,
    random_seed,
)

MAX_PROMPT_CHARS = 1000
"""Longer prompts are cut here (with a notice) before tokenization; the model's text processor
then truncates to its own token length (64 for mini and mega) and reports that too."""

_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_WHITESPACE_RUN = re.compile(r"\s+")


class ValidationError(ValueError):
    """A rejected parameter; the message tells the user what is allowed."""


@dataclass(frozen=True)
class NumberSpec:
    """The allowed range of one numeric parameter (bounds inclusive unless `above` is set)."""

    name: str
    default: float
    minimum: float
    maximum: float
    integer: bool = False
    above: bool = False  # the minimum itself is not allowed (strictly greater than)

    def allowed(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        low = f"greater than {_fmt(self.minimum)}" if self.above else f"from {_fmt(self.minimum)}"
        if self.above:
            return f"{kind} {low} and at most {_fmt(self.maximum)}"
        return f"{kind} {low} to {_fmt(self.maximum)}"


NUMBERS: dict[str, NumberSpec] = {
    spec.name: spec
    for spec in (
        NumberSpec("num_images", DEFAULT_NUM_IMAGES, 1, 16, integer=True),
        NumberSpec("temperature", DEFAULT_SAMPLING.temperature, 0.0, 5.0, above=True),
        NumberSpec("top_k", DEFAULT_SAMPLING.top_k, 1, 16384, integer=True),
        NumberSpec("top_p", DEFAULT_SAMPLING.top_p, 0.0, 1.0, above=True),
        NumberSpec("cond_scale", DEFAULT_SAMPLING.cond_scale, 1.0, 30.0),
    )
}
"""Ranges of the numeric parameters; the defaults are the request record's."""


def sampling_defaults(recommended: Mapping[str, float] | None = None) -> SamplingSettings:
    """The sampling settings to use when a request leaves them out: DALL·E Mini's, overridden by
    what the model recommends (values outside the allowed ranges are ignored)."""
    out: dict[str, int | float] = {}
    for name, value in (recommended or {}).items():
        if name in SAMPLING_FIELDS:
            try:
                out[name] = check_number(value, NUMBERS[name])
            except ValidationError:
                pass
    return SamplingSettings(**out)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _show(value: Any, limit: int = 40) -> str:
    """A short, printable rendering of a rejected value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _repair_utf16(text: str) -> tuple[str, bool]:
    """Join surrogate pairs that arrived as two code points and drop lone surrogates."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text, False
    repaired = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    dropped = repaired.count("\ufffd") > text.count("\ufffd")
    return repaired.replace("\ufffd", "") if dropped else repaired, dropped


def clean_text(value: Any, name: str, *, required: bool) -> tuple[str, list[str]]:
    """Check and clean one free-text field; returns the text and notices about what changed."""
    label = name.replace("_", " ")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValidationError(f"The {label} must be text (got {type(value).__name__} {_show(value)}).")
    notices: list[str] = []
    text, repaired = _repair_utf16(value)
    if repaired:
        notices.append(f"Invalid characters (unpaired UTF-16 surrogates) were removed from the {label}.")
    text = unicodedata.normalize("NFC", text)
    removed = 0
    kept = []
    for ch in text:
        if ch in "\t\n\r\v\f":
            kept.append(" ")
        elif unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS:
            removed += 1
        else:
            kept.append(ch)
    if removed:
        notices.append(f"{removed} control character(s) were removed from the {label}.")
    text = _WHITESPACE_RUN.sub(" ", "".join(kept)).strip()

    if not text:
        if required:
            raise ValidationError("Please enter a prompt: it is empty (or only spaces and control characters).")
        return "", notices
    if len(text) > MAX_PROMPT_CHARS:
        text = text[:MAX_PROMPT_CHARS].rstrip()
        notices.append(f"The {label} was cut to its first {MAX_PROMPT_CHARS} characters.")
    if not any(ch.isalnum() for ch in emoji.replace_emoji(text, replace=" ")):
        if emoji.emoji_count(text) == 0:
            raise ValidationError(f"The {label} needs at least one letter or digit (got {_show(text)}).")
        named = emoji.demojize(text, delimiters=(" ", " ")).replace("_", " ")
        text = _WHITESPACE_RUN.sub(" ", named).strip()
        notices.append(f"The {label} had only emoji; they were replaced by their names: {text!r}.")
    if any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text):
        notices.append(
            f"The {label} contains right-to-left text; the model was trained on English captions, so it "
            "is transliterated to Latin letters and may be understood poorly."
        )
    return text, notices


def check_number(value: Any, spec: NumberSpec) -> int | float:
    """Return `value` as the spec's type, `spec.default` for None; reject anything else outside it."""
    if value is None:
        return int(spec.default) if spec.integer else float(spec.default)
    allowed = f"{spec.name} must be {spec.allowed()}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(f"{allowed} (got {type(value).__name__} {_show(value)}).")
    x = float(value)
    if math.isnan(x) or math.isinf(x):
        raise ValidationError(f"{allowed} (got {_show(x)}).")
    if spec.integer and not x.is_integer():
        raise ValidationError(f"{allowed} (got {_show(value)}, which is not a whole number).")
    too_low = x <= spec.minimum if spec.above else x < spec.minimum
    if too_low or x > spec.maximum:
        raise ValidationError(f"{allowed} (got {_show(value)}).")
    return int(x) if spec.integer else x


def check_seed(value: Any, random_seed: Callable[[], int]) -> int:
    """-1 (or None) draws a random seed; otherwise a whole number from 0 to MAX_SEED."""
    allowed = f"seed must be {RANDOM_SEED} (random) or a whole number from 0 to {MAX_SEED}"
    if value is None:
        return random_seed()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(f"{allowed} (got {type(value).__name__} {_show(value)}).")
    x = float(value)
    if math.isnan(x) or math.isinf(x) or not x.is_integer():
        raise ValidationError(f"{allowed} (got {_show(value)}).")
    if isinstance(value, numbers.Integral):  # exact for huge ints, which float() would round
        seed = int(value)
    else:
        seed = int(x)
    if seed == RANDOM_SEED:
        return random_seed()
    if not 0 <= seed <= MAX_SEED:
        raise ValidationError(f"{allowed} (got {_show(value)}).")
    return seed


def check_model(value: Any, models: Mapping[str, str | None], default: str) -> str:
    """Only a name from the configured list, and only one usable here.

    `models` maps each configured name to None when it can be used, else to the reason it cannot.
    Paths and repository names are never accepted here: the list is configured by the operator.
    """
    if value is None or value == "":
        value = default
    names = ", ".join(models)
    if not isinstance(value, str):
        raise ValidationError(f"model must be one of: {names} (got {type(value).__name__} {_show(value)}).")
    if value not in models:
        raise ValidationError(f"Unknown model {_show(value)}; choose one of: {names}.")
    reason = models[value]
    if reason is not None:
        usable = ", ".join(n for n, r in models.items() if r is None) or "none"
        raise ValidationError(f"Model {value!r} cannot be used here ({reason}). Models available: {usable}.")
    return value


def check_flag(value: Any, name: str) -> bool:
    """A yes/no parameter: true/false (None: false; 0 and 1 are accepted too)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    raise ValidationError(f"{name} must be true or false (got {type(value).__name__} {_show(value)}).")


def validate_request(
    prompt: Any,
    negative_prompt: Any = "",
    model: Any = None,
    num_images: Any = None,
    seed: Any = None,
    temperature: Any = None,
    top_k: Any = None,
    top_p: Any = None,
    cond_scale: Any = None,
    seamless: Any = False,
    *,
    models: Mapping[str, str | None],
    default_model: str,
    draw_seed: Callable[[], int] = random_seed,
    recommended: Mapping[str, Mapping[str, float]] | None = None,
    client: str = LOCAL_CLIENT,
) -> GenerationRequest:
    """Check every parameter of one request; raise ValidationError naming the first bad one.

    Sampling settings left out (None) take the chosen model's `recommended` ones (by model name),
    else DALL·E Mini's defaults. `client` is whose request it is (set by the front end, never
    typed by the user), copied into the record."""
    text, notices = clean_text(prompt, "prompt", required=True)
    negative, negative_notices = clean_text(negative_prompt, "negative_prompt", required=False)
    chosen = check_model(model, models, default_model)
    count = check_number(num_images, NUMBERS["num_images"])
    chosen_seed = check_seed(seed, draw_seed)
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cond_scale": cond_scale}
    fallback = sampling_defaults((recommended or {}).get(chosen))
    sampling = {name: check_number(getattr(fallback, name) if value is None else value, NUMBERS[name])
                for name, value in given.items()}
    return GenerationRequest(
        prompt=text,
        negative_prompt=negative,
        model=chosen,
        num_images=count,
        seed=chosen_seed,
        sampling=SamplingSettings(**sampling),
        notices=tuple(notices + negative_notices),
        client=client,
        seamless=check_flag(seamless, "seamless"),
    )

