"""Tokenizers for the embedded model, trained on the generator's captions with `tokenizers`.

- DalleBart: a byte-level BPE in BART's layout (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4,
  `<s> … </s>` post-processing, no prefix space), saved as the five files `BartTokenizerFast`
  reads (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json),
  trained on *normalized* captions because the app normalizes prompts before tokenizing.
- `enwiki-words-frequency.txt`: "word count" lines from caption word counts; the text normalizer
  uses it to split hashtags, so it only needs the words this model knows.
- CLIP: a BPE with CLIP's own lowercase/whitespace normalizer, pre-tokenizer and `</w>` word
  suffix, saved through `CLIPTokenizerFast` so transformers loads it as-is.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenization pattern (special tokens, contractions, letter runs, single digits, punctuation).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def build_bart_tokenizer(normalized_captions: Sequence[str], folder: Path, vocab_size: int = 512) -> int:
    """Train the DalleBart byte-level BPE and write its five files; returns the vocabulary size."""
    from transformers import BartTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(BART_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(normalized_captions, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    ids = [tok.token_to_id(t) for t in BART_SPECIALS]
    if ids != list(range(len(BART_SPECIALS))):
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..4")
    fast = BartTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
        add_prefix_space=False, trim_offsets=True, errors="replace",
    )
    fast.save_pretrained(str(folder))
    _write_vocab_and_merges(tok, folder)
    _write_special_tokens_map(folder, {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
        "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>",
    })
    _set_tokenizer_class(folder, "BartTokenizer")
    return tok.get_vocab_size()


def _write_vocab_and_merges(tok: Tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt, the slow-tokenizer files of the published layout."""
    model = json.loads(tok.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))


def _write_special_tokens_map(folder: Path, tokens: dict[str, str]) -> None:
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2, sort_keys=True) + "\n")


def _set_tokenizer_class(folder: Path, name: str) -> None:
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_word_frequencies(normalized_captions: Iterable[str], path: Path) -> int:
    """`word count` lines, most frequent first (ties alphabetical); returns the number of words."""
    counts = collections.Counter(w for c in normalized_captions for w in c.split() if w.isalpha())
    lines = [f"{w} {n}" for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)


def build_clip_tokenizer(captions: Sequence[str], folder: Path, vocab_size: int = 512) -> int:
    """Train a CLIP-style BPE on the raw captions and save it via `CLIPTokenizerFast`; returns the vocab size."""
    from transformers import CLIPTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=CLIP_EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[CLIP_BOS, CLIP_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>", show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = _with_full_alphabet(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    fast = CLIPTokenizerFast(vocab=vocab, merges=merges)
    fast.save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    _write_special_tokens_map(folder, {
        "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS,
    })
    return len(vocab)


def _with_full_alphabet(vocab: dict[str, int]) -> dict[str, int]:
    """Add every byte symbol, bare and with `</w>`, that training did not keep.

    Without them a word ending in an unseen letter maps to <unk> = <|endoftext|>, and CLIP pools
    its text embedding at the first <|endoftext|>: the prompt would be cut short there.
    """
    vocab = dict(vocab)
    for ch in pre_tokenizers.ByteLevel.alphabet():
        for sym in (ch, ch + "</w>"):
            if sym not in vocab:
                vocab[sym] = len(vocab)
    return vocab
