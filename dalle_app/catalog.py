"""The configured model list, and the loaded models behind it.

The operator configures which models the app offers: the embedded default, DALL·E Mini and
Mega, plus any folder or hub repository listed in $DALLE_APP_MODELS (comma-separated). The UI
and the API can choose only among these names; a model that cannot be used here (not
downloaded while offline, missing files) stays in the list, marked with the reason, so users
see why it cannot be picked. Loading happens on first use, once per model, and a model that
fails to load fails only the requests that asked for it.

Operators shape this for a public server: $DALLE_APP_ALLOWED_MODELS keeps only the named models,
$DALLE_APP_DEFAULT_MODEL=auto (the default) picks DALL·E Mini where it can run (see
`choose_default`), and $DALLE_APP_MEMORY_GB bounds the memory of the loaded models: the least
recently used idle ones are unloaded to make room, and a model that cannot fit is refused with a
message instead of running the server out of memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from dalle_app.hardware import MEMORY_ENV
from dalle_app.request import SamplingSettings
from dalle_app.validation import sampling_defaults
from dalle_app.vocabulary import known_words, unknown_words, unknown_words_notice

log = logging.getLogger(__name__)

MODELS_ENV = "DALLE_APP_MODELS"
DEFAULT_MODEL_ENV = "DALLE_APP_DEFAULT_MODEL"
ALLOWED_ENV = "DALLE_APP_ALLOWED_MODELS"
EMBEDDED = "embedded"
PROGRESS_UPDATES = 16
"""Progress events per image in the app (scaled to the model's number of codes)."""
PREVIEWS = 4
"""Previews of the partial images per image in the app (each costs a VQGAN decode)."""
AUTO = "auto"
SPACE_ENV = "SPACE_ID"  # set by Hugging Face Spaces

MEGA_MIN_ACCELERATOR_GB = 16.0
"""Accelerator memory (as JAX reports it) from which `auto` prefers a cached DALL·E Mega."""
HUB_WEIGHTS_GB = {"mini": 1.75, "mega": 10.4, "vqgan": 0.3, "clip": 0.6}
"""Weight files of the named hub models, for a memory estimate before they are downloaded."""
WORKING_MEMORY_FACTOR = 1.5
"""Memory of a loaded model per GB of weight files: the weights plus the sampler's key/value
caches for a full batch and the compiled programs (an estimate, on the safe side)."""


@dataclass(frozen=True)
class ModelEntry:
    """One configured model: the name users pick, the parts hub.py resolves, and whether it runs here.

    `parts` maps "dalle", "vqgan" and "clip" to a hub.py reference (None = the embedded one);
    `reason` says why an unavailable model cannot be used, `note` anything worth knowing about
    an available one (e.g. that it will be downloaded on first use); `settings` are the sampling
    settings the model recommends (hub.recommended_settings), used where a request gives none.
    """

    name: str
    label: str
    parts: Mapping[str, str | None]
    available: bool = True
    reason: str = ""
    note: str = ""
    settings: Mapping[str, float] = field(default_factory=dict)
    memory_gb: float = 0.0  # estimated memory once loaded; 0 = unknown

    @property
    def choice_label(self) -> str:
        """The dropdown label: unusable models say why, briefly."""
        return self.label if self.available else f"{self.label} (unavailable: {short_reason(self.reason)})"


BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(EMBEDDED, "Embedded default (colored shapes, 64×64)", {"dalle": None, "vqgan": None, "clip": None}),
    ModelEntry("mini", "DALL·E Mini", {"dalle": "mini", "vqgan": "vqgan", "clip": "clip"}),
    ModelEntry("mega", "DALL·E Mega", {"dalle": "mega", "vqgan": "vqgan", "clip": "clip"}),
)
"""The models every install offers (hub.py resolves these references)."""


TEXT_CUT_NOTICE = "The prompt is longer than the model's text length; its end was ignored."


class ModelLoadError(RuntimeError):
    """A configured model could not be loaded; the message says why and what to do."""


def short_reason(reason: str, limit: int = 60) -> str:
    """The gist of a (possibly multi-line) reason, for a dropdown label."""
    lowered = reason.lower()
    if "offline" in lowered and ("cache" in lowered or "download" in lowered):
        return "not downloaded, offline"
    if "does not exist" in lowered or "missing" in lowered:
        return "model files missing"
    first = reason.strip().splitlines()[0] if reason.strip() else "unknown reason"
    return first if len(first) <= limit else first[: limit - 1] + "…"


def parse_model_list(value: str | None) -> list[str]:
    """$DALLE_APP_MODELS: comma-separated folders and repos (owner/name[@revision]), blanks dropped."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def entry_for(spec: str) -> ModelEntry:
    """A model given as `dalle[+vqgan[+clip]]` (each a folder, repo or hub.py name).

    Left out, the VQGAN and CLIP are the embedded ones (right for a model trained like the
    embedded default); a DalleBart made for DALL·E Mini's codes names them: `folder+vqgan+clip`.
    """
    refs = [part.strip() or None for part in spec.split("+")]
    if len(refs) > 3 or refs[0] is None:
        raise ValueError(f"{spec!r}: expected dalle[+vqgan[+clip]]")
    refs += [None] * (3 - len(refs))
    return ModelEntry(spec, spec, dict(zip(("dalle", "vqgan", "clip"), refs)))


def load_scheduler(entry: ModelEntry) -> Any:
    """Load the entry's pipeline behind its own request scheduler (what ModelPool keeps), with
    PROGRESS_UPDATES progress events and PREVIEWS previews over the codes of an image."""
    from dalle_app.pipeline import DallePipeline
    from dalle_app.scheduler import Scheduler

    pipeline = DallePipeline.from_pretrained(**entry.parts)
    steps = pipeline.image_length  # 256 for mini/mega, fewer for small models: scale the updates to it
    return Scheduler(pipeline, progress_every=max(1, steps // PROGRESS_UPDATES),
                     preview_every=max(1, steps // PREVIEWS))


def weights_gb(ref: str | None, kind: str) -> float:
    """GB of weight files behind one part of an entry: the files of a local folder or the
    embedded model, the known size of a named hub model, else 0 (unknown until downloaded)."""
    from dalle_app.hub import EMBEDDED_FOLDERS

    folder = EMBEDDED_FOLDERS[kind] if ref is None else Path(ref).expanduser()
    if folder.is_dir():
        return sum(f.stat().st_size for f in folder.glob("*") if f.suffix in (".msgpack", ".safetensors")) / 1e9
    return HUB_WEIGHTS_GB.get(str(ref), 0.0)


def estimate_memory_gb(entry: ModelEntry) -> float:
    """Memory the entry needs once loaded (WORKING_MEMORY_FACTOR × its weight files)."""
    return WORKING_MEMORY_FACTOR * sum(weights_gb(ref, kind) for kind, ref in entry.parts.items())


def choose_default(
    entries: Mapping[str, ModelEntry],
    env: Mapping[str, str],
    cached: Callable[[str | None, str], bool],
    accelerator_gb: Callable[[], float | None],
) -> tuple[str, str]:
    """`auto`: the model a visitor should get here, and why (one sentence).

    DALL·E Mini on a Hugging Face Space ($SPACE_ID), where the hub is reachable (and the Space's
    `preload_from_hub` has usually fetched it), or wherever it is already in the Hugging Face
    cache; DALL·E Mega instead when it is cached and an accelerator with enough memory is
    present; otherwise the embedded model, which needs no download.
    """
    mega, mini = entries.get("mega"), entries.get("mini")
    if mega is not None and mega.available and cached(mega.parts["dalle"], "dalle"):
        memory = accelerator_gb()
        if memory is not None and memory >= MEGA_MIN_ACCELERATOR_GB:
            return "mega", f"DALL·E Mega is downloaded and the GPU has {memory:.0f} GB"
    if mini is not None and mini.available:
        if env.get(SPACE_ENV):
            return "mini", "this is a Hugging Face Space"
        if cached(mini.parts["dalle"], "dalle"):
            return "mini", "DALL·E Mini is downloaded"
    if EMBEDDED in entries:
        return EMBEDDED, "DALL·E Mini is not downloaded here (set DALLE_APP_DEFAULT_MODEL=mini to get it)"
    first = next(iter(entries))
    return first, "it is the first allowed model"


def check_entry(entry: ModelEntry, describe: Callable[..., tuple[bool, str]]) -> ModelEntry:
    """`entry` with its availability filled in: usable only if every part is."""
    notes = []
    for kind, ref in entry.parts.items():
        try:
            available, why = describe(ref, kind)
        except Exception as e:  # a broken reference must not stop the app from starting
            available, why = False, f"{type(e).__name__}: {e}"
        if not available:
            return replace(entry, available=False, reason=f"{kind}: {why}" if len(entry.parts) > 1 else why)
        if "download" in why:
            notes.append(why)
    return replace(entry, available=True, reason="", note="; ".join(notes))


def describe_error(error: Exception) -> str:
    """The loaders' own errors carry a sentence; anything else (KeyError...) also needs its type."""
    if isinstance(error, (RuntimeError, ValueError, OSError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


class Catalog:
    """The models the app offers, in display order, with the default one."""

    def __init__(self, entries: list[ModelEntry], default: str, default_reason: str = "") -> None:
        """`entries` in display order; `default` is the name used when a request names none,
        `default_reason` why it was chosen (shown to users)."""
        self.entries = {entry.name: entry for entry in entries}
        if default not in self.entries:
            raise ValueError(
                f"default model {default!r} is not configured; use one of {', '.join(self.entries)} "
                f"or add it to {MODELS_ENV}"
            )
        self.default = default
        self.default_reason = default_reason

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        describe: Callable[..., tuple[bool, str]] | None = None,
        recommend: Callable[[str | None], Mapping[str, float]] | None = None,
        cached: Callable[[str | None, str], bool] | None = None,
        accelerator_gb: Callable[[], float | None] | None = None,
    ) -> "Catalog":
        """Build the list from the environment. `describe` (hub.describe_availability),
        `recommend` (hub.recommended_settings) and `cached` (hub.is_cached) never download;
        `accelerator_gb` (hardware.accelerator_memory_gb) is asked only to choose `auto`."""
        env = os.environ if env is None else env
        if describe is None:
            from dalle_app.hub import describe_availability as describe
        if recommend is None:
            from dalle_app.hub import recommended_settings as recommend
        if cached is None:
            from dalle_app.hub import is_cached as cached
        if accelerator_gb is None:
            from dalle_app.hardware import accelerator_memory_gb as accelerator_gb
        entries = list(BUILTIN_MODELS)
        for spec in parse_model_list(env.get(MODELS_ENV)):
            if spec not in {e.name for e in entries}:
                entries.append(entry_for(spec))
        entries = allowed_entries(entries, env.get(ALLOWED_ENV))
        checked = [check_entry(e, describe) for e in entries]
        checked = [replace(e, settings=dict(recommend(e.parts["dalle"])), memory_gb=estimate_memory_gb(e))
                   if e.available else e for e in checked]
        default, reason = env.get(DEFAULT_MODEL_ENV, "").strip() or AUTO, f"{DEFAULT_MODEL_ENV} says so"
        if default == AUTO:
            default, reason = choose_default({e.name: e for e in checked}, env, cached, accelerator_gb)
        return cls(checked, default, reason)

    def usability(self) -> dict[str, str | None]:
        """Name → None when usable, else the reason (what validation.check_model takes)."""
        return {name: None if e.available else e.reason for name, e in self.entries.items()}

    def recommended(self) -> dict[str, Mapping[str, float]]:
        """Name → the sampling settings that model recommends (what validate_request takes)."""
        return {name: e.settings for name, e in self.entries.items()}

    def sampling_defaults(self, name: str) -> SamplingSettings:
        """The settings a request for `name` gets when it gives none (unknown names: DALL·E Mini's)."""
        entry = self.entries.get(name)
        return sampling_defaults(entry.settings if entry is not None else None)

    def text_notices(self, name: str, normalized_prompt: str, truncated: bool) -> list[str]:
        """What to tell the user about how model `name` read the prompt.

        For a model whose training captions used a closed vocabulary (the embedded DalleBart),
        the words it never saw, which its tokenizer spells out byte by byte (usually what then
        overflows the text length); otherwise, when the text was cut, that its end was ignored.
        """
        entry = self.entries.get(name)
        if entry is not None and entry.parts.get("dalle") is None:
            from dalle_app.hub import EMBEDDED_FOLDERS, WORD_FILE

            words = unknown_words(normalized_prompt, known_words(EMBEDDED_FOLDERS["dalle"] / WORD_FILE))
            if words:
                return [unknown_words_notice(words)]
        return [TEXT_CUT_NOTICE] if truncated else []

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for a dropdown."""
        return [(e.choice_label, e.name) for e in self.entries.values()]

    def unavailable(self) -> list[ModelEntry]:
        return [e for e in self.entries.values() if not e.available]


def allowed_entries(entries: list[ModelEntry], allowed: str | None) -> list[ModelEntry]:
    """The entries $DALLE_APP_ALLOWED_MODELS names (all when unset), in display order."""
    names = parse_model_list(allowed)
    if not names:
        return entries
    unknown = [name for name in names if name not in {e.name for e in entries}]
    if unknown:
        raise ValueError(
            f"{ALLOWED_ENV} names {', '.join(map(repr, unknown))}, which is not a configured model; "
            f"use names among {', '.join(e.name for e in entries)} (add folders and repos to {MODELS_ENV})"
        )
    return [e for e in entries if e.name in names]


class ModelPool:
    """Loaded schedulers by model name: an explicit cache, filled on first use, bounded in memory.

    `load(entry)` builds the scheduler for one configured model. One lock per name makes
    concurrent first requests share a single load; a failed load is not cached, so fixing the
    files (or going online) and retrying works without a restart.

    `budget_gb` bounds the estimated memory (`ModelEntry.memory_gb`) of the loaded models: before
    a load that would exceed it, the least recently used models with no request waiting are
    closed (`Scheduler.close_if_idle`) and dropped; a model that cannot fit fails with a message
    that says so. None: no bound.

    The default model can be loaded in the background (`load_default_in_background`): until it
    is ready, requests that name no model go to the embedded one (`active_default`).
    """

    def __init__(self, catalog: Catalog, load: Callable[[ModelEntry], Any], budget_gb: float | None = None) -> None:
        self.catalog = catalog
        self.budget_gb = budget_gb
        self._load = load
        self._loaded: dict[str, Any] = {}  # in use order, least recently used first
        self._locks = {name: threading.Lock() for name in catalog.entries}
        self._memory = threading.Lock()  # guards _loaded's order and the budget check
        self._default_state = "ready"  # or "loading", "failed"
        self._default_error = ""

    def get(self, name: str) -> Any:
        """The scheduler for `name`, loading it if needed; raises ModelLoadError on failure."""
        if name not in self._locks:
            raise ModelLoadError(f"model {name!r} is not configured")
        scheduler = self.loaded(name)
        if scheduler is not None:
            return scheduler
        with self._locks[name]:
            scheduler = self.loaded(name)
            if scheduler is None:
                entry = self.catalog.entries[name]
                self._make_room(entry)
                try:
                    scheduler = self._load(entry)
                except ModelLoadError:
                    raise
                except MemoryError as e:
                    raise ModelLoadError(f"Not enough memory to load model {name!r}.") from e
                except Exception as e:  # any loader failure must stay this request's failure
                    raise ModelLoadError(f"Could not load model {name!r}: {describe_error(e)}") from e
                with self._memory:
                    self._loaded[name] = scheduler
            return scheduler

    def loaded(self, name: str) -> Any | None:
        """The scheduler for `name` if it is already loaded (marking it used), else None (never loads)."""
        with self._memory:
            scheduler = self._loaded.pop(name, None)
            if scheduler is not None:
                self._loaded[name] = scheduler
            return scheduler

    def loaded_names(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._memory:
            return list(self._loaded)

    def _make_room(self, entry: ModelEntry) -> None:
        """Unload idle models, least recently used first, until `entry` fits the budget."""
        if self.budget_gb is None:
            return
        need = entry.memory_gb
        if need > self.budget_gb:
            raise ModelLoadError(
                f"{entry.label} needs about {need:.1f} GB of memory, more than this server allows "
                f"({self.budget_gb:.1f} GB, set by {MEMORY_ENV}). Choose a smaller model."
            )
        with self._memory:
            for name in list(self._loaded):
                used = sum(self.catalog.entries[n].memory_gb for n in self._loaded)
                if used + need <= self.budget_gb:
                    break
                if self._loaded[name].close_if_idle():  # no request waits for it; a running loop ends
                    log.info("unloaded model %r (least recently used) to make room for %r", name, entry.name)
                    del self._loaded[name]
            used = sum(self.catalog.entries[n].memory_gb for n in self._loaded)
        if used + need > self.budget_gb:
            busy = ", ".join(self.loaded_names())
            raise ModelLoadError(
                f"{entry.label} needs about {need:.1f} GB of memory, and the models in use right now "
                f"({busy}) leave too little of this server's {self.budget_gb:.1f} GB. Please try again "
                "in a minute, or choose a model that is already loaded."
            )

    # ---- the default model, loaded behind the embedded one ---------------------------------

    def load_default_in_background(self) -> threading.Thread:
        """Start loading the default model in a thread; returns it (already started)."""
        name = self.catalog.default
        entry = self.catalog.entries[name]
        self._default_state = "loading"

        def run() -> None:
            started = time.perf_counter()
            log.info("loading the default model %r in the background (%s); until it is ready, requests "
                     "that name no model go to the embedded model", name, entry.note or "no download needed")
            try:
                self.get(name)
            except ModelLoadError as e:
                self._default_error = str(e)
                self._default_state = "failed"
                log.error("the default model %r could not be loaded: %s", name, e)
                return
            self._default_state = "ready"
            log.info("the default model %r is ready (%.1f s)", name, time.perf_counter() - started)

        thread = threading.Thread(target=run, name="dalle-default-model", daemon=True)
        thread.start()
        return thread

    def default_loading(self) -> bool:
        """Whether the default model is still loading in the background."""
        return self._default_state == "loading"

    def active_default(self) -> str:
        """The model for requests that name none: the default, or the embedded model while the
        default loads in the background (or after it failed to load)."""
        default = self.catalog.default
        waiting = self._default_state != "ready" and default not in self.loaded_names()
        return EMBEDDED if waiting and EMBEDDED in self.catalog.entries else default

    def default_status(self) -> str:
        """One line for users: which model answers by default, and why."""
        entry = self.catalog.entries[self.catalog.default]
        why = f", because {self.catalog.default_reason}" if self.catalog.default_reason else ""
        if self.active_default() == self.catalog.default:
            return f"Model: {entry.label}{why}."
        if self._default_state == "loading":
            return f"{entry.label} is loading{why}; until it is ready the embedded model answers."
        return f"{entry.label} could not be loaded ({self._default_error}); the embedded model answers."
