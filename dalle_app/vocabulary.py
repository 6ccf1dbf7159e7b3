"""Words a closed-vocabulary model never saw in training, so the user is told which ones.

The embedded model was trained on captions of a small procedural world; its word list
(`enwiki-words-frequency.txt` in its folder, written from those captions) holds every word it
knows. Any other word is spelled out byte by byte by its tokenizer, which fills the model's
short text length without meaning anything to it. Naming those words tells the user what went
wrong; "the prompt was cut" would not. DALL·E Mini and Mega learned from open web captions, so
they have no such list.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

_WORD = re.compile(r"[a-z0-9']+")


@functools.lru_cache(maxsize=8)
def known_words(word_file: str | os.PathLike) -> frozenset[str]:
    """The words of a word list ("word count" per line, as the text normalizer reads it)."""
    lines = Path(word_file).read_text(encoding="utf8").splitlines()
    return frozenset(line.split()[0] for line in lines if line.split())


def unknown_words(normalized_text: str, known: frozenset[str]) -> list[str]:
    """The words of a normalized prompt (lowercase ASCII) that are not in `known`, each once, in order."""
    return list(dict.fromkeys(w for w in _WORD.findall(normalized_text) if w not in known))


def unknown_words_notice(words: list[str]) -> str:
    """The notice shown when the embedded model is given words it never saw."""
    return (f"The embedded model does not know: {', '.join(words)}. It draws coloured shapes "
            "(e.g. \"a red square above a blue circle\"); choose DALL·E Mini or Mega for anything else.")
