"""Captions → what the models train on: normalized text, DalleBart token ids, and the tokenizer phase.

Captions are normalized with the app's own `TextNormalizer` (dalle_app.text) so training ids are
exactly the ids the app produces for the same prompt. That normalizer needs ftfy, emoji and
Unidecode; where they are not installed (e.g. a bare GPU machine), `plain_normalize` stands in:
for the generator's captions (lowercase ASCII words separated by single spaces) both give
`" " + caption`, which tests/test_train.py checks on a sample of captions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dalle_app.data import batch as data_batch
from dalle_app.model_files import WORD_FILE
from dalle_app.train.common import PhaseLog, phase_seed, write_json
from dalle_app.train.tokenizers import build_bart_tokenizer, build_clip_tokenizer, write_word_frequencies


def plain_normalize(text: str) -> str:
    """The normalizer's result on plain lowercase-word captions: one leading space, single spaces."""
    return " " + " ".join(text.lower().split())


def caption_normalizer(word_file: Path) -> Callable[[str], str]:
    """The app's `TextNormalizer`, or `plain_normalize` when its dependencies are missing."""
    try:
        from dalle_app.text import TextNormalizer

        return TextNormalizer(word_file)
    except ImportError as e:
        print(f"[text] {e}: normalizing captions with plain_normalize (same result on generator captions)")
        return plain_normalize


@functools.lru_cache(maxsize=4)
def cached_normalizer(word_file: Path) -> Callable[[str], str]:
    """`caption_normalizer` with a memo of the captions seen (the generator repeats them a lot).

    Cached per word file and per process: worker processes that render scenes build their own once.
    """
    return functools.lru_cache(maxsize=None)(caption_normalizer(word_file))


class CaptionEncoder:
    """Captions → (input_ids, attention_mask) int32 (N, max_text_length), as the app tokenizes prompts."""

    def __init__(self, tokenizer_folder: Path, max_text_length: int) -> None:
        from dalle_app.text import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_folder, max_text_length)
        self.word_file = tokenizer_folder / WORD_FILE

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        normalize = cached_normalizer(self.word_file)
        return self.tokenize_normalized([normalize(c) for c in captions])

    def tokenize_normalized(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Already normalized texts → ids and mask."""
        enc = self.tokenizer.encode_batch(list(texts))
        return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32))

    def unconditional(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw "" tokenized *without* normalization: the app's unconditional input."""
        e = self.tokenizer.encode("")
        return np.array(e.ids, np.int32), np.array(e.attention_mask, np.int32)


def build_tokenizers(out: Path, seed: int, num_captions: int = 20_000, vocab_size: int = 512) -> dict:
    """Train both tokenizers on `num_captions` training captions → out/tokenizers/{dalle,clip}/."""
    folder = out / "tokenizers"
    log = PhaseLog(folder, "tokenizers")
    captions = data_batch(phase_seed(seed, "tokenizers"), num_captions, "train").captions
    dalle, clip = folder / "dalle", folder / "clip"
    dalle.mkdir(parents=True, exist_ok=True)
    # The normalizer reads the word list (for hashtags) at construction: write a first one from
    # the raw words, then the final one from the normalized captions.
    write_word_frequencies([c.lower() for c in captions], dalle / WORD_FILE)
    normalize = caption_normalizer(dalle / WORD_FILE)
    normalized = [normalize(c) for c in captions]
    report = {
        "captions": num_captions,
        "words": write_word_frequencies(normalized, dalle / WORD_FILE),
        "dalle_vocab_size": build_bart_tokenizer(normalized, dalle, vocab_size),
        "clip_vocab_size": build_clip_tokenizer(captions, clip, vocab_size),
    }
    from dalle_app.text import load_tokenizer

    lengths = [sum(e.attention_mask) for e in load_tokenizer(dalle, 256).encode_batch(normalized)]
    report["max_caption_tokens"] = max(lengths)
    log(0, **report)
    write_json(folder / "report.json", report)
    return report
