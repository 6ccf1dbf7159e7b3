"""Text normalizer, hashtag splitter and processor (dalle_app/text.py)."""

from __future__ import annotations

import json
import pathlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from dalle_app import text
from dalle_app.text import HashtagSplitter, TextNormalizer, TextProcessor, load_word_costs

TINY = Path(__file__).parent / "fixtures" / "reference" / "dallebart_tiny_a"


@pytest.fixture
def word_file(tmp_path: Path) -> Path:
    """A small frequency list, most frequent first (cost = log(rank + 1))."""
    words = ["the", "golden", "sword", "samurai", "warrior", "dog", "'s", "top", "list",
             "1", "0", "2", "sam", "urai", "war", "rior", "gold", "en"]  # fmt: skip
    path = tmp_path / "enwiki-words-frequency.txt"
    path.write_text("".join(f"{w} {1000 - i}\n" for i, w in enumerate(words)), encoding="utf8")
    return path


@pytest.fixture(scope="module")
def normalizer() -> TextNormalizer:
    return TextNormalizer(TINY / "enwiki-words-frequency.txt")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [  # docs/model-notes.md §4.3, verified against dalle-mini 0.1.5
        ("Sunset over a lake in the mountains", " sunset over a lake in the mountains"),
        ("The Eiffel Tower landing on the moon!!!", " the eiffel tower landing on the moon"),
        ("Price: $1,000.50 on 12/25... (really?)", " price, $ 1000.50 on 12/25, really"),
        ("Don't you'd it's <b>bold</b> http://x.com/a", " don't you'd it's bold"),
        ("I ❤️ cats 😀", " i, red heart, cats, grinning face"),
    ],
)
def test_examples_of_the_notes(normalizer: TextNormalizer, raw: str, normalized: str) -> None:
    assert normalizer(raw) == normalized


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("", " "),
        ("&amp;lt;b&amp;gt;x", " x"),  # html unescaped twice, then the tag removed
        ("[12] a castle [3]", " a castle"),
        ("aaaaaaaah!!!! viii", " ah, viii"),  # 4+ repeats collapse, 3 stay
        ("well-known  1,000,000\tstars", " well known 1000000 stars"),
        ("Café naïve", " cafe naive"),
        ('"quoted" `text`', ' " quoted " text "'),
    ],
)
def test_more_normalizer_steps(normalizer: TextNormalizer, raw: str, normalized: str) -> None:
    assert normalizer(raw) == normalized


def test_hashtags_are_split_into_words(word_file: Path) -> None:
    normalizer = TextNormalizer(word_file)
    assert normalizer("a #SamuraiWarrior with a #goldensword") == (
        " a samurai warrior with a golden sword"
    )
    split = HashtagSplitter(word_file)
    assert split("samurai_warrior") == "samurai warrior"  # cut on non-alphanumerics first
    assert split("top10list") == "top 10 list"  # digit groups joined
    assert split("dog's") == "dog's"  # a split-off 's re-attached
    assert split("zq") == "z q"  # unknown text falls back to single characters
    assert split("") == ""


def test_missing_word_file_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        TextNormalizer(tmp_path / "nowhere.txt")


def test_word_costs_follow_rank(word_file: Path) -> None:
    costs = load_word_costs(word_file)
    assert costs.cost["the"] == 0.0  # log(1)
    assert costs.cost["golden"] == pytest.approx(np.log(2))
    assert costs.max_word_length == len("samurai")


def test_word_file_is_read_once_per_path(word_file: Path, monkeypatch) -> None:
    reads = []
    original = pathlib.Path.read_text

    def counting_read_text(self, *args, **kwargs):
        reads.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", counting_read_text)
    first = TextNormalizer(word_file)
    second = TextNormalizer(word_file.parent / ".." / word_file.parent.name / word_file.name)
    assert first("no hashtag here") == " no hashtag here"
    assert reads == []  # read on the first hashtag only
    assert first("#goldensword") == second("#goldensword") == " golden sword"
    assert [p for p in reads if p.name == word_file.name] == [word_file.resolve()]
    assert text._read_word_costs.cache_info().currsize >= 1


def test_person_token_is_deterministic(normalizer: TextNormalizer) -> None:
    raw = "<PERSON> walking with <person>, and a dog"
    out = normalizer(raw)
    assert out == normalizer(raw)
    assert out in {f" {a} walking with {b}, and a dog" for a in ("a person", "someone", "somebody")
                   for b in ("a person", "someone", "somebody")}  # fmt: skip
    assert normalizer("<person> and <person>") == " people"
    draws = {normalizer("<person>", rng=random.Random(seed)) for seed in range(40)}
    assert draws == {" a person", " someone"} or draws == {" a person", " someone", " somebody"}


@pytest.fixture(scope="module")
def processor() -> TextProcessor:
    return TextProcessor.from_pretrained(TINY)


def test_processor_shapes_and_uncond(processor: TextProcessor) -> None:
    length = json.loads((TINY / "config.json").read_text())["max_text_length"]
    out = processor(["a dog", "a cat", "pizza"])
    for name in ("input_ids", "attention_mask", "input_ids_uncond", "attention_mask_uncond"):
        array = getattr(out, name)
        assert array.shape == (3, length) and array.dtype == np.int32
    assert out.normalized == [" a dog", " a cat", " pizza"]
    assert out.input_ids[0, 0] == 0  # <s>
    # the raw empty string, not normalized " ": <s></s><pad>...
    assert out.input_ids_uncond.tolist() == [[0, 2] + [1] * (length - 2)] * 3
    assert out.attention_mask_uncond.tolist() == [[1, 1] + [0] * (length - 2)] * 3
    assert processor([]).input_ids.shape == (0, length)


def test_truncation_keeps_eos_and_is_reported(processor: TextProcessor) -> None:
    length = processor.max_text_length
    out = processor(["pizza", "a very long prompt about a brown star and a white planet " * 3])
    assert out.truncated == [False, True]
    short, long = out.input_ids.tolist()
    assert long[-1] == 2 and out.attention_mask[1].all()  # </s> kept in the last position
    eos = short.index(2)
    assert short[eos + 1 :] == [1] * (length - eos - 1)  # <pad>
    assert out.attention_mask[0, eos + 1 :].sum() == 0
    assert not out.negative_truncated


def test_negative_prompt_replaces_uncond_and_is_normalized(processor: TextProcessor) -> None:
    out = processor(["a dog", "a cat"], negative_prompt="Blurry!!! #grey")
    reference = processor([" blurry, grey"])
    assert processor.normalize("Blurry!!! #grey") == " blurry, grey"
    assert out.input_ids_uncond.tolist() == [reference.input_ids[0].tolist()] * 2
    assert out.attention_mask_uncond.tolist() == [reference.attention_mask[0].tolist()] * 2
    assert out.input_ids.tolist() == processor(["a dog", "a cat"]).input_ids.tolist()


def test_prompts_must_be_a_list(processor: TextProcessor) -> None:
    with pytest.raises(TypeError):
        processor("a dog")


def test_without_normalization_the_text_is_tokenized_as_given(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns("*.msgpack", "*.npz", "enwiki*"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "normalize_text": False}))
    out = TextProcessor.from_pretrained(folder)(["A DOG!!!"])
    assert out.normalized == ["A DOG!!!"]


def test_missing_tokenizer_file_is_named(tmp_path: Path) -> None:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextProcessor.from_pretrained(tmp_path, word_file=TINY / "enwiki-words-frequency.txt")


def test_a_normalizing_model_without_its_word_file_is_named_not_downloaded(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder, ignore=shutil.ignore_patterns("*.msgpack", "*.npz", "enwiki*"))
    with pytest.raises(FileNotFoundError, match=text.WORD_FILE):
        TextProcessor.from_pretrained(folder)
    given = TextProcessor.from_pretrained(folder, word_file=TINY / text.WORD_FILE)
    assert given(["A DOG!!!"]).normalized == [" a dog"]


def test_tokenizing_never_imports_the_hub() -> None:
    import subprocess
    import sys

    code = "import sys, dalle_app.text; print('dalle_app.hub' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == "False"
