"""Model references → local folders: short names, hub repo ids, local folders, the embedded models.

Downloads go through huggingface_hub's cache (so a model downloaded once, by this app or by `hf
download`, is reused, and HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE work as everywhere else), and
fetch only the files the model kind needs: never pickled weights (*.bin, *.pt, *.pth).
Every failure a user can fix is a `ModelNotAvailableError` that says what is missing and how to
get it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from dalle_app.model_files import EMBEDDED_FOLDER_NAMES, GENERATION_CONFIG, TOKENIZER_FILES, WORD_FILE
from dalle_app.request import SAMPLING_FIELDS

KINDS = ("dalle", "vqgan", "clip")

_PACKAGE = Path(__file__).resolve().parent
ASSETS = _PACKAGE / "assets" if (_PACKAGE / "assets").is_dir() else _PACKAGE.parent / "assets"
"""The embedded models: `assets/` of a clone, or `dalle_app/assets` of an installed package."""
EMBEDDED_FOLDERS = {kind: ASSETS / name for kind, name in EMBEDDED_FOLDER_NAMES.items()}

# Hub revisions (commit hashes) of the named models. Only the VQGAN's is recorded: it is the one
# DALL·E Mini's own notebook pins. The full commit hashes of the mini, mega and CLIP repos (and
# so of the word list, which lives in the mini repo) are not recorded here; until they are, those
# models follow `main`. Pin one by writing its 40-character hash here (and in README.md's
# `preload_from_hub`).
VQGAN_REVISION = "e93a26e7707683d349bf5d5c41c5b0ef69b677a9"
MINI_REVISION: str | None = None
MEGA_REVISION: str | None = None
CLIP_REVISION: str | None = None

WORD_FILE_REPO = "dalle-mini/dalle-mini"  # the normalizer always takes it from mini, even for mega
WORD_FILE_REVISION = MINI_REVISION

# Exact file names (no wildcards), so a download can never pull pickled weights.
DOWNLOAD_FILES: dict[str, list[str]] = {
    "dalle": ["config.json", "flax_model.msgpack", *TOKENIZER_FILES],
    "vqgan": ["config.json", "flax_model.msgpack"],
    "clip": ["config.json", "model.safetensors", "preprocessor_config.json", *TOKENIZER_FILES],
}

# What a folder must hold to be loadable; each entry is satisfied by any one of its names.
REQUIRED_FILES: dict[str, list[tuple[str, ...]]] = {
    "dalle": [("config.json",), ("flax_model.msgpack",), ("tokenizer.json",)],
    "vqgan": [("config.json",), ("flax_model.msgpack",)],
    "clip": [("config.json",), ("model.safetensors", "flax_model.msgpack")],
}


class ModelNotAvailableError(RuntimeError):
    """A model cannot be loaded here; the message says why and what to do about it."""


@dataclass(frozen=True)
class ModelReference:
    """Where a model comes from: a hub repo at a revision (None = main), or a local folder."""

    kind: str | None
    repo_id: str | None = None
    revision: str | None = None
    folder: Path | None = None
    size_hint: str = ""

    def __str__(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return f"{self.repo_id}@{self.revision or 'main'}"


NAMED_MODELS: dict[str, ModelReference] = {
    "mini": ModelReference("dalle", "dalle-mini/dalle-mini", MINI_REVISION, size_hint="about 1.75 GB"),
    "mega": ModelReference("dalle", "dalle-mini/dalle-mega", MEGA_REVISION, size_hint="about 10.4 GB"),
    "vqgan": ModelReference("vqgan", "dalle-mini/vqgan_imagenet_f16_16384", VQGAN_REVISION),
    "clip": ModelReference("clip", "openai/clip-vit-base-patch32", CLIP_REVISION),
    **{f"embedded-{kind}": ModelReference(kind, folder=f) for kind, f in EMBEDDED_FOLDERS.items()},
}


def parse_reference(
    ref: str | os.PathLike | None, kind: str | None = None, revision: str | None = None
) -> ModelReference:
    """Interpret `ref`: None (the embedded model of `kind`), a name of `NAMED_MODELS`, an existing
    folder, or a hub repo id `owner/name` with an optional `@revision` (or `revision=`).

    `kind` ("dalle", "vqgan", "clip") is checked against the name's kind; for repo ids and
    folders it says which files to fetch and require (left None, config.json decides).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    if ref is None:
        if kind is None:
            raise ValueError("give a model reference or a kind (for the embedded model)")
        return NAMED_MODELS[f"embedded-{kind}"]
    text = os.fspath(ref).strip()
    if text in NAMED_MODELS:
        named = NAMED_MODELS[text]
        if kind is not None and kind != named.kind:
            raise ValueError(f"{text!r} is a {named.kind} model, not a {kind} model")
        if revision is not None and named.repo_id is not None:
            named = replace(named, revision=revision)
        return named
    folder = Path(text).expanduser()
    if folder.is_dir():
        return ModelReference(kind, folder=folder.resolve())
    repo_id, _, inline_revision = text.partition("@")
    if inline_revision and revision is not None and inline_revision != revision:
        raise ValueError(f"{text!r} names revision {inline_revision!r} but revision={revision!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if "/" not in repo_id or text.startswith((".", "/", "~")):
        names = ", ".join(NAMED_MODELS)
        raise ModelNotAvailableError(
            f"{text!r} is not a model name ({names}), an existing folder, "
            "or a Hugging Face hub repo id like owner/name[@revision]"
        )
    return ModelReference(kind, repo_id=repo_id, revision=inline_revision or revision)


def recommended_settings(ref: str | os.PathLike | None) -> dict[str, float]:
    """Sampling settings a local DalleBart folder recommends in its `generation_config.json`
    (models trained here write one, tuned for them); {} elsewhere, which means DALL·E Mini's
    defaults. Never downloads: hub models have no such file."""
    try:
        reference = parse_reference(ref, "dalle")
    except (ValueError, ModelNotAvailableError):
        return {}
    path = reference.folder / GENERATION_CONFIG if reference.folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return {}
    numbers = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: numbers[k] for k in SAMPLING_FIELDS if k in numbers}


def resolve_model(
    ref: str | os.PathLike | None, kind: str | None = None, revision: str | None = None
) -> Path:
    """Return a local folder holding the model `ref` (see `parse_reference`), downloading it into
    the Hugging Face cache if needed (only the files of `DOWNLOAD_FILES[kind]`).

    With HF_HUB_OFFLINE=1 (or no network), a complete cached snapshot is used; otherwise
    `ModelNotAvailableError` explains how to get the files.
    """
    reference = parse_reference(ref, kind, revision)
    if reference.folder is not None:
        return _checked_folder(reference.folder, reference.kind, str(reference))
    kind = reference.kind or _kind_from_config(_hub_config(reference), str(reference))
    folder = _hub_call(
        reference,
        kind,
        lambda offline: snapshot_download(
            reference.repo_id,
            revision=reference.revision,
            allow_patterns=DOWNLOAD_FILES[kind],
            local_files_only=offline,
        ),
    )
    return _checked_folder(Path(folder), kind, str(reference), reference)


def resolve_word_file(dalle_folder: str | os.PathLike) -> Path:
    """The normalizer's `enwiki-words-frequency.txt`: the folder's own copy if it has one, else
    the file of the dalle-mini/dalle-mini hub repo (as the original does, even for mega)."""
    own = Path(dalle_folder) / WORD_FILE
    if own.is_file():
        return own
    reference = ModelReference("dalle", WORD_FILE_REPO, WORD_FILE_REVISION)
    try:
        return Path(
            hf_hub_download(WORD_FILE_REPO, WORD_FILE, revision=WORD_FILE_REVISION,
                            local_files_only=constants.is_offline_mode())
        )
    except (EntryNotFoundError, OSError) as error:
        raise ModelNotAvailableError(
            f"The text normalizer needs {WORD_FILE} (34 MB, from the {WORD_FILE_REPO} hub repo): "
            f"it is not in {dalle_folder}, {_why_unavailable(reference)}. To fix: on a machine "
            f"with internet access run\n  hf download {WORD_FILE_REPO} {WORD_FILE} --local-dir .\n"
            f"and copy the file into the model folder, or set HF_HOME to a Hugging Face cache "
            f"that holds it.{_detail(error)}"
        ) from error


def normalizer_word_file(dalle_folder: str | os.PathLike) -> Path | None:
    """What `TextProcessor.from_pretrained` needs as `word_file` for this DalleBart folder: the
    resolved word list (`resolve_word_file`), or None when the model does not normalize text."""
    if not _read_config(Path(dalle_folder)).get("normalize_text", False):
        return None
    return resolve_word_file(dalle_folder)


def is_cached(ref: str | os.PathLike | None, kind: str | None = None) -> bool:
    """Whether the hub model `ref` is complete in the local Hugging Face cache (never downloads;
    False for local folders and the embedded models, which are not hub models)."""
    try:
        reference = parse_reference(ref, kind)
    except (ValueError, ModelNotAvailableError):
        return False
    if reference.folder is not None:
        return False
    try:
        folder = snapshot_download(
            reference.repo_id,
            revision=reference.revision,
            allow_patterns=DOWNLOAD_FILES[reference.kind] if reference.kind else None,
            local_files_only=True,
        )
        _checked_folder(Path(folder), reference.kind, str(reference), reference)
    except (EntryNotFoundError, OSError, ModelNotAvailableError):
        return False
    return True


def describe_availability(
    ref: str | os.PathLike | None, kind: str | None = None, revision: str | None = None
) -> tuple[bool, str]:
    """Whether `ref` can be loaded here, and a one-line reason, without downloading anything.

    A hub model not in the cache counts as available unless offline mode is on: it will be
    downloaded on first use (whether the hub is reachable is only known then).
    """
    offline = constants.is_offline_mode()
    try:
        reference = parse_reference(ref, kind, revision)
    except (ValueError, ModelNotAvailableError) as error:
        return False, str(error)
    if reference.folder is not None:
        try:
            folder = _checked_folder(reference.folder, reference.kind, str(reference))
        except ModelNotAvailableError as error:
            return False, str(error)
        where = f"local folder {folder}"
    else:
        try:
            folder = Path(
                snapshot_download(
                    reference.repo_id,
                    revision=reference.revision,
                    allow_patterns=DOWNLOAD_FILES[reference.kind] if reference.kind else None,
                    local_files_only=True,
                )
            )
            folder = _checked_folder(folder, reference.kind, str(reference), reference)
        except (EntryNotFoundError, OSError, ModelNotAvailableError):
            if offline:
                return False, (
                    f"{reference} is not in the local cache and offline mode is on "
                    "(HF_HUB_OFFLINE=1)"
                )
            size = f" ({reference.size_hint})" if reference.size_hint else ""
            return True, f"{reference} will be downloaded from the Hugging Face hub when used{size}"
        where = f"{reference} is cached"
    is_dalle = (reference.kind or _kind_of(folder, str(reference))) == "dalle"
    note = _word_file_note(folder) if is_dalle else ""
    if note and offline:
        return False, f"{where}, but {note} and offline mode is on (HF_HUB_OFFLINE=1)"
    if note:
        return True, f"{where}; {note}: it will be downloaded on first use"
    return True, where


# ---------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(f"cannot read {path}: {error}") from error


def _kind_of(folder: Path, label: str) -> str:
    return _kind_from_config(_read_config(folder), label)


def _kind_from_config(config: dict, label: str) -> str:
    """DalleBart and CLIP configs name their model_type; the VQGAN config has none but is the
    only one with a codebook size (n_embed)."""
    model_type = config.get("model_type")
    if model_type == "dallebart":
        return "dalle"
    if model_type == "clip":
        return "clip"
    if model_type is None and "n_embed" in config:
        return "vqgan"
    raise ModelNotAvailableError(
        f"{label}: config.json (model_type={model_type!r}) is not a DalleBart, VQGAN or CLIP model"
    )


def _checked_folder(
    folder: Path, kind: str | None, label: str, reference: ModelReference | None = None
) -> Path:
    """`folder` if it holds every file the kind needs, else an error naming the missing files."""
    if not folder.is_dir():
        raise ModelNotAvailableError(f"model folder {folder} does not exist")
    kind = kind or _kind_of(folder, label)
    missing = [
        " or ".join(names)
        for names in REQUIRED_FILES[kind]
        if not any((folder / name).is_file() for name in names)
    ]
    if missing:
        fix = (
            f" Either the repo does not provide them or the cached copy is incomplete; to get "
            f"them, {_download_hint(reference, kind)}"
            if reference is not None
            else ""
        )
        raise ModelNotAvailableError(
            f"{label} is not a complete {kind} model folder: missing {', '.join(missing)}.{fix}"
        )
    return folder


def _hub_config(reference: ModelReference) -> dict:
    """config.json of a hub repo (downloaded into the cache), to learn the model kind."""
    path = _hub_call(
        reference,
        None,
        lambda offline: hf_hub_download(
            reference.repo_id, "config.json", revision=reference.revision, local_files_only=offline
        ),
    )
    return _read_config(Path(path).parent)


def _hub_call(reference: ModelReference, kind: str | None, call):
    """Run a huggingface_hub download (cache only when offline), turning its errors into
    `ModelNotAvailableError`s that say what to do."""
    try:
        return call(constants.is_offline_mode())
    except RevisionNotFoundError as error:
        raise ModelNotAvailableError(
            f"The hub repo {reference.repo_id} has no revision {reference.revision!r}."
        ) from error
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise ModelNotAvailableError(
            f"The hub repo {reference.repo_id} does not exist or needs access rights "
            f"(for a private or gated repo, log in with `hf auth login`). ({error})"
        ) from error
    except (EntryNotFoundError, OSError) as error:
        raise ModelNotAvailableError(
            f"Model {reference} cannot be loaded: {_why_unavailable(reference)}. To fix: "
            f"{_download_hint(reference, kind)}{_detail(error)}"
        ) from error


def _why_unavailable(reference: ModelReference) -> str:
    reason = (
        "offline mode is on (HF_HUB_OFFLINE=1)"
        if constants.is_offline_mode()
        else "the Hugging Face hub could not be reached"
    )
    return f"{reason} and it is not in the local cache ({constants.HF_HUB_CACHE})"


def _detail(error: Exception) -> str:
    """The library's own error text, when it adds something (a network error's cause); in
    offline mode it would only suggest library arguments, so it is left to the chained cause."""
    return "" if constants.is_offline_mode() else f" ({type(error).__name__}: {error})"


def _download_hint(reference: ModelReference, kind: str | None) -> str:
    """A `hf download` command that fetches exactly the files we use into a plain folder."""
    files = DOWNLOAD_FILES[kind] if kind else list(dict.fromkeys(sum(DOWNLOAD_FILES.values(), [])))
    if kind in (None, "dalle"):
        files = [*files, WORD_FILE]  # absent from some repos (mega): then simply not fetched
    command = ["hf download", reference.repo_id, *files]
    if reference.revision:
        command += ["--revision", reference.revision]
    command += ["--local-dir", f"./{reference.repo_id.split('/')[-1]}"]
    return (
        "on a machine with internet access run\n  " + " ".join(command) + "\nand pass that "
        "folder (copied here) as the model, or set HF_HOME to a Hugging Face cache that holds "
        f"{reference}."
    )


def _word_file_note(folder: Path) -> str:
    """'' when the normalizer's word list is at hand (in the folder or the cache), else why not."""
    if not _read_config(folder).get("normalize_text", False) or (folder / WORD_FILE).is_file():
        return ""
    try:
        hf_hub_download(WORD_FILE_REPO, WORD_FILE, revision=WORD_FILE_REVISION, local_files_only=True)
        return ""
    except (EntryNotFoundError, OSError):
        return f"the text normalizer's {WORD_FILE} (from {WORD_FILE_REPO}, 34 MB) is not cached"
