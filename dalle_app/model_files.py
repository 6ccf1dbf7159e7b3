"""The names of the files and folders a model is made of, shared by loading, resolving and training.

Kept apart from the modules that use them so that each name is written once and importing it
costs nothing (training on a bare machine imports it without the text normalizer's packages).
"""

from __future__ import annotations

WORD_FILE = "enwiki-words-frequency.txt"
"""The text normalizer's word frequency list (for splitting hashtags), kept in a DalleBart folder."""

TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
)
"""The byte-level BPE tokenizer files a DalleBart or CLIP folder carries."""

GENERATION_CONFIG = "generation_config.json"
"""The sampling settings a DalleBart folder recommends (models trained here write one)."""

EMBEDDED_FOLDER_NAMES = {"dalle": "dalle-embedded", "vqgan": "vqgan-embedded", "clip": "clip-embedded"}
"""The embedded models' folders under assets/, by model kind."""
