"""The configured model list, and the loaded models behind it.

The operator configures which models the app offers: the embedded default, DALL·E Mini and
Mega, plus any folder or hub repository listed in $DALLE_APP_MODELS (comma-separated). The UI
and the API can choose only among these names; a model that cannot be used here (not
downloaded while offline, missing files) stays in the list, marked with the reason, so users
see why it cannot be picked. Loading happens on first use, once per model, and a model that
fails to load fails only the requests that asked for it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from dalle_app.request import SamplingSettings
from dalle_app.validation import sampling_defaults

MODELS_ENV = "DALLE_APP_MODELS"
DEFAULT_MODEL_ENV = "DALLE_APP_DEFAULT_MODEL"
EMBEDDED = "embedded"
PROGRESS_UPDATES = 16
"""Progress events per image in the app (scaled to the model's number of codes)."""
PREVIEWS = 4
"""Previews of the partial images per image in the app (each costs a VQGAN decode)."""


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

    def __init__(self, entries: list[ModelEntry], default: str) -> None:
        """`entries` in display order; `default` is the name used when a request names none."""
        self.entries = {entry.name: entry for entry in entries}
        if default not in self.entries:
            raise ValueError(
                f"default model {default!r} is not configured; use one of {', '.join(self.entries)} "
                f"or add it to {MODELS_ENV}"
            )
        self.default = default

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        describe: Callable[..., tuple[bool, str]] | None = None,
        recommend: Callable[[str | None], Mapping[str, float]] | None = None,
    ) -> "Catalog":
        """Build the list from the environment; `describe` (hub.describe_availability) and
        `recommend` (hub.recommended_settings) never download."""
        env = os.environ if env is None else env
        if describe is None:
            from dalle_app.hub import describe_availability as describe
        if recommend is None:
            from dalle_app.hub import recommended_settings as recommend
        entries = list(BUILTIN_MODELS)
        for spec in parse_model_list(env.get(MODELS_ENV)):
            if spec not in {e.name for e in entries}:
                entries.append(entry_for(spec))
        default = env.get(DEFAULT_MODEL_ENV, "").strip() or EMBEDDED
        checked = [check_entry(e, describe) for e in entries]
        return cls([replace(e, settings=dict(recommend(e.parts["dalle"]))) if e.available else e for e in checked],
                   default)

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

    def choices(self) -> list[tuple[str, str]]:
        """(label, name) pairs for a dropdown."""
        return [(e.choice_label, e.name) for e in self.entries.values()]

    def unavailable(self) -> list[ModelEntry]:
        return [e for e in self.entries.values() if not e.available]


class ModelPool:
    """Loaded schedulers by model name: an explicit cache, filled on first use.

    `load(entry)` builds the scheduler for one configured model. One lock per name makes
    concurrent first requests share a single load; a failed load is not cached, so fixing the
    files (or going online) and retrying works without a restart.
    """

    def __init__(self, catalog: Catalog, load: Callable[[ModelEntry], Any]) -> None:
        self.catalog = catalog
        self._load = load
        self._loaded: dict[str, Any] = {}
        self._locks = {name: threading.Lock() for name in catalog.entries}

    def get(self, name: str) -> Any:
        """The scheduler for `name`, loading it if needed; raises ModelLoadError on failure."""
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._locks:
            raise ModelLoadError(f"model {name!r} is not configured")
        with self._locks[name]:
            if name not in self._loaded:
                try:
                    self._loaded[name] = self._load(self.catalog.entries[name])
                except ModelLoadError:
                    raise
                except MemoryError as e:
                    raise ModelLoadError(f"Not enough memory to load model {name!r}.") from e
                except Exception as e:  # any loader failure must stay this request's failure
                    raise ModelLoadError(f"Could not load model {name!r}: {describe_error(e)}") from e
            return self._loaded[name]

    def loaded(self, name: str) -> Any | None:
        """The scheduler for `name` if it is already loaded, else None (never loads)."""
        return self._loaded.get(name)
