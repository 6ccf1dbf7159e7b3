"""Model resolution (dalle_app/hub.py). Never touches the network.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, at import, into `huggingface_hub.constants`;
the tests therefore patch those constants (HF_HUB_CACHE → a cache built here in tmp,
HF_HUB_OFFLINE → True) rather than the environment.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from dalle_app import hub
from dalle_app.hub import ModelNotAvailableError

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
DALLE = REFERENCE / "dallebart_tiny_a"
VQGAN = REFERENCE / "vqgan_tiny_a"
CLIP = REFERENCE / "clip_tiny_safetensors"
MINI_COMMIT = "1" * 40
MEGA_COMMIT = "2" * 40


@pytest.fixture(autouse=True)
def offline_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty huggingface cache in tmp, with offline mode on."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def add_snapshot(
    cache: Path,
    repo_id: str,
    commit: str,
    source: Path,
    *,
    ref: str | None = "main",
    skip: tuple[str, ...] = ("expected*",),
) -> Path:
    """Lay out a repo as huggingface_hub's cache does: snapshots/<commit>/files, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot, ignore=shutil.ignore_patterns(*skip))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


# --- references --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "repo_id", "revision"),
    [
        ("mini", "dalle", "dalle-mini/dalle-mini", None),
        ("mega", "dalle", "dalle-mini/dalle-mega", None),
        ("vqgan", "vqgan", "dalle-mini/vqgan_imagenet_f16_16384",
         "e93a26e7707683d349bf5d5c41c5b0ef69b677a9"),
        ("clip", "clip", "openai/clip-vit-base-patch32", None),
    ],
)  # fmt: skip
def test_names_map_to_repos(name: str, kind: str, repo_id: str, revision: str | None) -> None:
    reference = hub.parse_reference(name)
    assert (reference.kind, reference.repo_id, reference.revision) == (kind, repo_id, revision)
    assert hub.parse_reference(name, revision="abc").revision == "abc"


@pytest.mark.parametrize("kind", ["dalle", "vqgan", "clip"])
def test_embedded_names_are_shipped_folders(kind: str) -> None:
    expected = Path(hub.__file__).resolve().parent.parent / "assets" / f"{kind}-embedded"
    assert hub.parse_reference(f"embedded-{kind}").folder == expected
    assert hub.parse_reference(None, kind=kind).folder == expected


def test_repo_ids_with_revisions() -> None:
    assert hub.parse_reference("owner/name@v1.0").revision == "v1.0"
    assert hub.parse_reference("owner/name", revision="abc").revision == "abc"
    assert hub.parse_reference("owner/name").repo_id == "owner/name"
    with pytest.raises(ValueError, match="revision"):
        hub.parse_reference("owner/name@a", revision="b")
    with pytest.raises(ValueError, match="not a dalle model"):
        hub.parse_reference("vqgan", kind="dalle")
    for bad in ("no-such-name", "./missing/folder", "/missing/folder"):
        with pytest.raises(ModelNotAvailableError, match="not a model name"):
            hub.parse_reference(bad)


# --- local folders -----------------------------------------------------------------------


@pytest.mark.parametrize(("folder", "kind"), [(DALLE, "dalle"), (VQGAN, "vqgan"), (CLIP, "clip")])
def test_local_folders_resolve_and_kind_comes_from_config(folder: Path, kind: str) -> None:
    assert hub.resolve_model(folder) == folder.resolve()
    assert hub.resolve_model(str(folder), kind=kind) == folder.resolve()
    assert hub.describe_availability(folder) == (True, f"local folder {folder.resolve()}")


def test_local_folder_missing_a_file_names_it(tmp_path: Path) -> None:
    shutil.copytree(DALLE, tmp_path / "m", ignore=shutil.ignore_patterns("flax_model.msgpack"))
    with pytest.raises(ModelNotAvailableError, match="missing flax_model.msgpack"):
        hub.resolve_model(tmp_path / "m")
    available, reason = hub.describe_availability(tmp_path / "m")
    assert not available and "flax_model.msgpack" in reason


def test_clip_folder_accepts_either_weight_format() -> None:
    assert hub.resolve_model(REFERENCE / "clip_tiny_flax", kind="clip").name == "clip_tiny_flax"


# --- the huggingface cache, offline ------------------------------------------------------


def test_cached_snapshots_resolve_offline(offline_cache: Path) -> None:
    mini = add_snapshot(offline_cache, "dalle-mini/dalle-mini", MINI_COMMIT, DALLE)
    vqgan = add_snapshot(offline_cache, "dalle-mini/vqgan_imagenet_f16_16384",
                         hub.VQGAN_REVISION, VQGAN, ref=None)  # fmt: skip
    clip = add_snapshot(offline_cache, "openai/clip-vit-base-patch32", "3" * 40, CLIP)
    assert hub.resolve_model("mini") == mini
    assert hub.resolve_model("vqgan") == vqgan  # pinned commit: found without refs/
    assert hub.resolve_model("clip") == clip
    assert hub.resolve_model("dalle-mini/dalle-mini") == mini  # kind read from the cached config
    assert hub.describe_availability("mini") == (True, "dalle-mini/dalle-mini@main is cached")


def test_word_file_comes_from_the_mini_repo_for_mega(offline_cache: Path) -> None:
    mini = add_snapshot(offline_cache, "dalle-mini/dalle-mini", MINI_COMMIT, DALLE)
    mega = add_snapshot(offline_cache, "dalle-mini/dalle-mega", MEGA_COMMIT, DALLE,
                        skip=("expected*", hub.WORD_FILE))  # fmt: skip
    assert hub.resolve_model("mega") == mega
    assert hub.resolve_word_file(mega) == mini / hub.WORD_FILE
    assert hub.resolve_word_file(DALLE) == DALLE / hub.WORD_FILE  # a folder's own copy first
    assert hub.normalizer_word_file(mega) == mini / hub.WORD_FILE  # mega normalizes its prompts


def test_a_model_that_does_not_normalize_needs_no_word_file(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    shutil.copytree(DALLE, folder, ignore=shutil.ignore_patterns("expected*", hub.WORD_FILE))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "normalize_text": False}))
    assert hub.normalizer_word_file(folder) is None


def test_offline_without_the_word_file_is_explained(offline_cache: Path) -> None:
    add_snapshot(offline_cache, "dalle-mini/dalle-mega", MEGA_COMMIT, DALLE,
                 skip=("expected*", hub.WORD_FILE))  # fmt: skip
    with pytest.raises(ModelNotAvailableError, match=r"enwiki-words-frequency.txt.*offline"):
        hub.resolve_word_file(hub.resolve_model("mega"))
    available, reason = hub.describe_availability("mega")
    assert not available and hub.WORD_FILE in reason


def test_offline_with_an_empty_cache_gives_a_clear_error() -> None:
    with pytest.raises(ModelNotAvailableError) as error:
        hub.resolve_model("mega")
    message = str(error.value)
    for part in ("dalle-mini/dalle-mega", "HF_HUB_OFFLINE=1", "not in the local cache",
                 "hf download dalle-mini/dalle-mega", "--local-dir", "HF_HOME"):  # fmt: skip
        assert part in message
    with pytest.raises(ModelNotAvailableError, match=f"--revision {hub.VQGAN_REVISION}"):
        hub.resolve_model("vqgan")
    available, reason = hub.describe_availability("mega")
    assert not available and "offline" in reason


def test_incomplete_cached_snapshot_names_the_missing_file(offline_cache: Path) -> None:
    add_snapshot(offline_cache, "dalle-mini/dalle-mini", MINI_COMMIT, DALLE,
                 skip=("expected*", "flax_model.msgpack"))  # fmt: skip
    with pytest.raises(ModelNotAvailableError, match="missing flax_model.msgpack"):
        hub.resolve_model("mini")


def test_not_cached_while_online_is_offered_for_download(monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # describe never downloads
    available, reason = hub.describe_availability("mega")
    assert available and "will be downloaded" in reason and "10.4 GB" in reason


# --- what gets downloaded ----------------------------------------------------------------

PICKLE_FILES = ["pytorch_model.bin", "model.pt", "model.pth", "model.pkl", "model.ckpt",
                "weights.pickle", "tf_model.h5", "sub/pytorch_model.bin"]  # fmt: skip


@pytest.mark.parametrize("kind", hub.KINDS)
def test_download_patterns_never_match_pickles(kind: str) -> None:
    patterns = hub.DOWNLOAD_FILES[kind]
    assert not [f for f in PICKLE_FILES for p in patterns if fnmatch.fnmatch(f, p)]


@pytest.mark.parametrize(
    ("name", "source", "weights"),
    [("mega", DALLE, "flax_model.msgpack"), ("vqgan", VQGAN, "flax_model.msgpack"),
     ("clip", CLIP, "model.safetensors")],
)  # fmt: skip
def test_resolve_downloads_only_the_kinds_files(
    name: str, source: Path, weights: str, monkeypatch, tmp_path: Path
) -> None:
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(source)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve_model(name) == source
    reference = hub.parse_reference(name)
    [(repo_id, kwargs)] = calls
    assert repo_id == reference.repo_id and kwargs["revision"] == reference.revision
    assert kwargs["allow_patterns"] == hub.DOWNLOAD_FILES[reference.kind]
    assert weights in kwargs["allow_patterns"] and kwargs["local_files_only"] is False

    calls.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.resolve_model(name)
    assert calls[0][1]["local_files_only"] is True


def test_recommended_settings_come_from_a_local_generation_config(tmp_path: Path) -> None:
    config = tmp_path / "generation_config.json"
    config.write_text('{"cond_scale": 3.0, "top_k": 8, "top_p": "high", "other": 1}')
    assert hub.recommended_settings(tmp_path) == {"cond_scale": 3.0, "top_k": 8}
    config.write_text("{not json")
    assert hub.recommended_settings(tmp_path) == {}
    assert hub.recommended_settings(tmp_path / "missing") == {}
    assert hub.recommended_settings("mini") == {}  # hub models: DALL·E Mini's defaults, nothing downloaded
    shipped = hub.recommended_settings(None)
    assert set(shipped) == {"temperature", "top_k", "top_p", "cond_scale"}


def test_the_hub_does_not_import_validation() -> None:
    import subprocess
    import sys

    code = "import sys, dalle_app.hub; print('dalle_app.validation' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == "False"
