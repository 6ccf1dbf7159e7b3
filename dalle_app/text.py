"""Prompt text → token ids, exactly as dalle-mini 0.1.5's `DalleBartProcessor` does it.

The models were trained on captions passed through a fixed text normalizer, and the tokenizer
runs with `add_prefix_space=False`, so the normalizer's output (always one leading space) decides
how the first word is tokenized: skipping or changing a step changes the ids the model sees.
The normalizer is written here (not imported from dalle-mini, whose dependencies are pinned to
2022 versions); its behaviour depends on the versions of ftfy, emoji and Unidecode, which
requirements.txt pins.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import emoji
import ftfy
import numpy as np
from tokenizers import Tokenizer, pre_tokenizers
from unidecode import unidecode

from dalle_app.model_files import WORD_FILE

# --------------------------------------------------------------------------------------------
# Hashtag splitting (wordninja-style segmentation with the checkpoint's word frequency list)
# --------------------------------------------------------------------------------------------

_HASHTAG_PIECE_SEPARATOR = re.compile(r"[^a-zA-Z0-9']+")


@dataclass(frozen=True)
class WordCosts:
    """Cost of each known word (log(rank + 1), rank = 0-based line index) and the longest word."""

    cost: dict[str, float]
    max_word_length: int


def load_word_costs(path: str | os.PathLike) -> WordCosts:
    """Read `enwiki-words-frequency.txt` (first token of each line, most frequent first).

    The real file is 34 MB; parsing it takes seconds and the dict holds ~300 MB, so results are
    kept in an explicit per-path cache (`_read_word_costs`): every normalizer built on the same
    file shares one dict. The cache is keyed by the resolved path and never invalidated (the
    file is a fixed asset).
    """
    return _read_word_costs(str(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _read_word_costs(resolved_path: str) -> WordCosts:
    cost: dict[str, float] = {}
    # str.splitlines (not split("\n")) so ranks match the original's line numbering.
    for rank, line in enumerate(Path(resolved_path).read_text(encoding="utf8").splitlines()):
        fields = line.split()
        if fields:  # the original would crash on a blank line; skip it, keeping later ranks
            cost[fields[0]] = math.log(rank + 1)  # a repeated word keeps its last (higher) cost
    if not cost:
        raise ValueError(f"word frequency file {resolved_path} has no words")
    return WordCosts(cost=cost, max_word_length=max(len(w) for w in cost))


class HashtagSplitter:
    """Split a hashtag body into words: "samuraiwarrior" → "samurai warrior".

    The body is cut on characters other than ASCII letters, digits and "'"; each piece is then
    segmented by dynamic programming to the split of least total word cost (unknown substrings
    cost infinity; ties go to the shorter last word). A split-off "'s" is re-attached to the
    word before it and consecutive digit groups are joined.

    The word list is read on the first hashtag, not at construction: most prompts have none,
    and reading it costs seconds and hundreds of MB.
    """

    def __init__(self, word_file: str | os.PathLike) -> None:
        self.word_file = Path(word_file).resolve()
        if not self.word_file.is_file():
            raise FileNotFoundError(f"word frequency file {self.word_file} does not exist")

    def __call__(self, hashtag: str) -> str:
        pieces = _HASHTAG_PIECE_SEPARATOR.split(hashtag)
        return " ".join(word for piece in pieces for word in self._segment(piece))

    def _segment(self, text: str) -> list[str]:
        words = load_word_costs(self.word_file)
        cost_of, longest = words.cost, words.max_word_length
        # best[i] = (least cost of text[:i], length of the last word in that split)
        best: list[tuple[float, int]] = [(0.0, 0)]
        for end in range(1, len(text) + 1):
            best.append(
                min(
                    (best[end - n][0] + cost_of.get(text[end - n : end].lower(), math.inf), n)
                    for n in range(1, min(end, longest) + 1)
                )
            )
        split: list[str] = []  # built right to left
        end = len(text)
        while end > 0:
            length = best[end][1]
            word = text[end - length : end]
            joins_next = (
                word != "'"
                and bool(split)
                and (split[-1] == "'s" or (word[-1].isdigit() and split[-1][0].isdigit()))
            )
            if joins_next:
                split[-1] = word + split[-1]
            else:
                split.append(word)
            end -= length
        return split[::-1]


# --------------------------------------------------------------------------------------------
# Text normalizer (docs/model-notes.md §4.3: 25 steps, in this order)
# --------------------------------------------------------------------------------------------

# `<person>` (CC12M) is replaced by one of these, drawn with these weights (wiki word counts).
_PERSON_WORDS = ("a person", "someone", "somebody")
_PERSON_WEIGHTS = (282265, 121194, 12219)
_PERSON_GROUP = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")

_TMP = "xtokx"  # marker protecting dots, quotes and slashes from the punctuation steps


def _sub(pattern: str, replacement: str):
    compiled = re.compile(pattern)
    return lambda text: compiled.sub(replacement, text)


_remove_wiki_ref_start = _sub(r"\A\s*\[\d+\]", "")
_remove_wiki_ref_end = _sub(r"\[\d+\]\s*\Z", "")
_remove_html_tags = _sub(r"<[^<]+?>", " ")
_remove_urls = _sub(r"http\S+", "")
_remove_comma_in_number = _sub(r"(\d),(\d{3})", r"\1\2")
_protect_dots = _sub(r"(\w)\.(\w)", rf"\1{_TMP}dot{_TMP}\2")
_protect_quotes = _sub(r"'(?=(?:[stdm]|ll|re|ve)\b)", f"{_TMP}quote{_TMP}")
_protect_dates = _sub(r"(\d)/(\d)", rf"\1{_TMP}slash{_TMP}\2")
_split_hyphenated = _sub(r"(\w)-(\w)", r"\1 \2")
_space_special_chars = _sub(r"([%&\/$*])", r" \1 ")
_HASHTAG = re.compile(r"#(\w+)")
_ignore_chars = _sub(r"[_#\\]", " ")
_simplify_quotes = _sub(r"['\"`]", ' " ')
_punctuation_to_commas = _sub(r"[()[\].,|:;?!=+~\-\/{}]", ",")
_restore_dots = _sub(f"{_TMP}dot{_TMP}", ".")
_restore_quotes = _sub(f"{_TMP}quote{_TMP}", "'")
_restore_dates = _sub(f"{_TMP}slash{_TMP}", "/")
_collapse_repeats = _sub(r"(\D)(\1{3,})", r"\1")  # 4+ of a non-digit → 1 (3 kept: "viii")
_merge_quotes = _sub(r'(\s*"+\s*)+', ' " ')
_merge_commas = _sub(r"(\s*,+\s*)+", ", ")
_single_spaces = _sub(r"\s+", " ")


def _replace_person_tokens(text: str, rng: random.Random) -> str:
    text = _PERSON_GROUP.sub(" people ", text)
    while "<person>" in text:
        word = rng.choices(_PERSON_WORDS, weights=_PERSON_WEIGHTS)[0]
        text = text.replace("<person>", f" {word} ", 1)
    return text


def _strip_outer_commas(text: str) -> str:
    text = text.strip()
    if text.endswith(","):
        text = text[:-1]
    if text.startswith(","):
        text = text[1:]
    return text.strip()


class TextNormalizer:
    """DALL·E Mini's caption normalizer: `normalizer("A RED cube!!!")` → `" a red cube"`.

    The only random step replaces `<person>` tokens. By default each call seeds a fresh
    `random.Random` with the input text itself, so normalization is a pure function of the text
    (the same prompt always gives the same ids); pass `rng` to draw from a generator you control.
    """

    def __init__(self, word_file: str | os.PathLike) -> None:
        self._split_hashtag = HashtagSplitter(word_file)

    def __call__(self, text: str, rng: random.Random | None = None) -> str:
        rng = rng if rng is not None else random.Random(text)
        t = ftfy.fix_text(text)  # 1
        t = html.unescape(html.unescape(t))  # 2
        t = emoji.demojize(t)  # 3 (unidecode would drop emojis)
        t = unidecode(t)  # 4
        t = t.lower()  # 5
        t = _replace_person_tokens(t, rng)  # 6
        t = _remove_wiki_ref_end(_remove_wiki_ref_start(t))  # 7
        t = _remove_html_tags(t)  # 8
        t = _remove_urls(t)  # 9
        t = _remove_comma_in_number(_remove_comma_in_number(t))  # 10
        t = _protect_dots(t)  # 11
        t = _protect_quotes(t)  # 12
        t = _protect_dates(t)  # 13
        t = _space_special_chars(_split_hyphenated(t))  # 14
        t = _HASHTAG.sub(lambda m: self._split_hashtag(m.group(1)), t)  # 15
        t = _ignore_chars(t)  # 16
        t = _simplify_quotes(t)  # 17
        t = _punctuation_to_commas(t)  # 18
        t = _restore_dates(_restore_quotes(_restore_dots(t)))  # 19
        t = _collapse_repeats(t)  # 20
        t = _merge_quotes(t)  # 21
        t = _merge_commas(t)  # 22
        t = _single_spaces(t)  # 23
        t = _strip_outer_commas(t)  # 24
        return f" {t}"  # 25


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPrompts:
    """Encoder inputs for a batch of B prompts, all (B, max_text_length) int32.

    `input_ids_uncond`/`attention_mask_uncond` are the unconditional branch of
    super-conditioning: the raw empty string, or the negative prompt when one is given.
    `normalized` is the text actually tokenized; `truncated[i]` says prompt i was longer than the
    model's text length and lost its end (`negative_truncated` the same for the negative prompt).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    input_ids_uncond: np.ndarray
    attention_mask_uncond: np.ndarray
    normalized: list[str]
    truncated: list[bool]
    negative_truncated: bool = False


def _token_content(value: object, default: str) -> str:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return str(value) if value else default


def load_tokenizer(folder: str | os.PathLike, max_text_length: int) -> Tokenizer:
    """The folder's byte-level BPE tokenizer, padding and truncating to `max_text_length`.

    Read with `tokenizers` from tokenizer.json: it gives the same ids as the original's
    `BartTokenizerFast(padding="max_length", truncation=True)` (truncation keeps `</s>` last)
    without importing transformers. `add_prefix_space` comes from tokenizer_config.json
    (False for DALL·E Mini), as transformers would apply it.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json: a DalleBart folder needs the tokenizer files of its "
            "hub repo (tokenizer.json, vocab.json, merges.txt, special_tokens_map.json, "
            "tokenizer_config.json)"
        )
    tokenizer = Tokenizer.from_file(str(path))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf8")) if config_path.is_file() else {}
    if isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
        tokenizer.pre_tokenizer.add_prefix_space = bool(config.get("add_prefix_space", False))
    pad_token = _token_content(config.get("pad_token"), "<pad>")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=max_text_length)
    tokenizer.enable_padding(length=max_text_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


DEFAULT_MAX_TEXT_LENGTH = 64
"""Token length of DALL·E Mini and Mega, for a config.json that does not give one."""


class TextProcessor:
    """Prompts → `TokenizedPrompts`, the counterpart of dalle-mini's `DalleBartProcessor`."""

    def __init__(
        self, tokenizer: Tokenizer, max_text_length: int, normalizer: TextNormalizer | None
    ) -> None:
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.normalizer = normalizer
        # The unconditional input is the raw "" (no normalization), as in training, where
        # blank captions were set after normalization.
        self._uncond = tokenizer.encode("")

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, word_file: str | os.PathLike | None = None
    ) -> "TextProcessor":
        """Build from a DalleBart folder (config.json: `normalize_text`, `max_text_length`).

        The normalizer's word list is `word_file`, else the folder's own WORD_FILE. Nothing is
        downloaded here: a model without its own copy needs the caller to resolve one
        (`dalle_app.hub.resolve_word_file`).
        """
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf8"))
        max_text_length = int(config.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH))
        normalizer = None
        if config.get("normalize_text", False):
            word_file = folder / WORD_FILE if word_file is None else Path(word_file)
            if not word_file.is_file():
                raise FileNotFoundError(
                    f"the text normalizer of {folder} needs {WORD_FILE}: put it in the folder, or "
                    "resolve it with dalle_app.hub.resolve_word_file and pass it as word_file")
            normalizer = TextNormalizer(word_file)
        return cls(load_tokenizer(folder, max_text_length), max_text_length, normalizer)

    def normalize(self, text: str) -> str:
        """The text the tokenizer will see (unchanged when the model has normalize_text off)."""
        return self.normalizer(text) if self.normalizer is not None else text

    def __call__(self, prompts: list[str], negative_prompt: str | None = None) -> TokenizedPrompts:
        """Tokenize B prompts; a `negative_prompt` replaces the empty unconditional input.

        The negative prompt is normalized like a prompt: it is ordinary caption text, and the
        model only ever saw captions in normalized form (the empty string is the exception
        because the training blank was the raw "").
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        normalized = [self.normalize(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(normalized) if normalized else []
        uncond = self._uncond
        negative_truncated = False
        if negative_prompt is not None:
            uncond = self.tokenizer.encode(self.normalize(negative_prompt))
            negative_truncated = bool(uncond.overflowing)
        batch = len(prompts)
        shape = (batch, self.max_text_length)
        return TokenizedPrompts(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int32).reshape(shape),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(
                shape
            ),
            input_ids_uncond=np.tile(np.array(uncond.ids, dtype=np.int32), (batch, 1)),
            attention_mask_uncond=np.tile(
                np.array(uncond.attention_mask, dtype=np.int32), (batch, 1)
            ),
            normalized=normalized,
            truncated=[bool(e.overflowing) for e in encodings],
            negative_truncated=negative_truncated,
        )
