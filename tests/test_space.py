"""Running as a public Space: the `auto` default model, the operator's allowlist and memory
budget, the embedded model's unknown-word notice, the machine checks and the CLI's exit codes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from dalle_app import __version__, cli, hardware
from dalle_app.catalog import (
    EMBEDDED,
    TEXT_CUT_NOTICE,
    Catalog,
    ModelEntry,
    ModelLoadError,
    ModelPool,
    choose_default,
)
from dalle_app.hub import VQGAN_REVISION
from tests.app_support import make_tiny_models
from tests.test_hub import add_snapshot


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp, offline."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return make_tiny_models(tmp_path_factory.mktemp("models") / "tiny")


def cache_tiny_as_mini(cache: Path, tiny: dict[str, str]) -> None:
    """The tiny model set under the repo ids of DALL·E Mini, its VQGAN (at the pinned revision) and CLIP."""
    add_snapshot(cache, "dalle-mini/dalle-mini", "1" * 40, Path(tiny["dalle"]))
    add_snapshot(cache, "dalle-mini/vqgan_imagenet_f16_16384", VQGAN_REVISION, Path(tiny["vqgan"]), ref=None)
    add_snapshot(cache, "openai/clip-vit-base-patch32", "3" * 40, Path(tiny["clip"]))


def no_accelerator() -> None:
    return None


# --- the auto default ------------------------------------------------------------------------


def test_auto_picks_mini_from_the_hf_cache_on_a_space_and_generates_with_it(hf_cache, tiny, tmp_path, monkeypatch,
                                                                            capsys):
    cache_tiny_as_mini(hf_cache, tiny)
    catalog = Catalog.from_env({"SPACE_ID": "someone/dalle"}, accelerator_gb=no_accelerator)
    assert catalog.default == "mini" and catalog.default_reason == "this is a Hugging Face Space"
    assert Catalog.from_env({}, accelerator_gb=no_accelerator).default_reason == "DALL·E Mini is downloaded"

    # The real path: `dalle-app` with no --model, on a Space, draws with what is cached as mini.
    for name in ("DALLE_APP_DEFAULT_MODEL", "DALLE_APP_MODELS", "DALLE_APP_ALLOWED_MODELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/dalle")
    out = tmp_path / "grid.png"
    assert cli.main(["a purple diamond", "--images", "1", "--seed", "3", "--out", str(out)]) == 0
    assert "model mini ready" in capsys.readouterr().err and out.is_file()


def test_auto_is_the_embedded_model_when_nothing_is_cached(hf_cache):
    catalog = Catalog.from_env({}, accelerator_gb=no_accelerator)
    assert catalog.default == EMBEDDED and "not downloaded" in catalog.default_reason


def test_auto_prefers_a_cached_mega_only_with_a_big_accelerator():
    entries = {e.name: e for e in Catalog.from_env({"DALLE_APP_DEFAULT_MODEL": "embedded"},
                                                    lambda ref, kind: (True, "here")).entries.values()}
    def cached(ref, kind):
        return ref in ("mini", "mega")

    assert choose_default(entries, {}, cached, lambda: 40.0)[0] == "mega"
    assert choose_default(entries, {}, cached, lambda: 8.0)[0] == "mini"
    assert choose_default(entries, {}, cached, no_accelerator)[0] == "mini"
    assert choose_default(entries, {}, lambda ref, kind: False, lambda: 40.0)[0] == EMBEDDED
    assert choose_default(entries, {"SPACE_ID": "a/b"}, lambda ref, kind: False, no_accelerator)[0] == "mini"


def test_the_allowlist_keeps_only_the_named_models():
    def describe(ref, kind):
        return True, "here"

    catalog = Catalog.from_env({"DALLE_APP_ALLOWED_MODELS": "mini, embedded", "SPACE_ID": "a/b"}, describe,
                               accelerator_gb=no_accelerator)
    assert list(catalog.entries) == ["embedded", "mini"] and catalog.default == "mini"
    with pytest.raises(ValueError, match="DALLE_APP_ALLOWED_MODELS names 'megaa'"):
        Catalog.from_env({"DALLE_APP_ALLOWED_MODELS": "embedded,megaa"}, describe)


# --- the memory budget and the model loaded in the background -----------------------------


class FakeScheduler:
    def __init__(self, name: str, waiting: int = 0) -> None:
        self.name, self.waiting, self.closed = name, waiting, False

    def close_if_idle(self) -> bool:
        self.closed = not self.waiting
        return self.closed


def budget_catalog() -> Catalog:
    entries = [ModelEntry(name, name.upper(), {"dalle": None}, memory_gb=gb)
               for name, gb in ((EMBEDDED, 1.0), ("a", 4.0), ("b", 4.0), ("huge", 20.0))]
    return Catalog(entries, EMBEDDED)


def test_least_recently_used_idle_models_are_unloaded_to_fit_the_budget():
    pool = ModelPool(budget_catalog(), lambda entry: FakeScheduler(entry.name), budget_gb=8.5)
    embedded, a = pool.get(EMBEDDED), pool.get("a")
    pool.get(EMBEDDED)  # used again: "a" is now the least recently used
    pool.get("b")
    assert pool.loaded_names() == [EMBEDDED, "b"] and a.closed and not embedded.closed
    with pytest.raises(ModelLoadError, match=r"HUGE needs about 20.0 GB .* \(8.5 GB, set by DALLE_APP_MEMORY_GB\)"):
        pool.get("huge")


def test_a_model_with_waiting_requests_is_never_unloaded():
    pool = ModelPool(budget_catalog(), lambda entry: FakeScheduler(entry.name, waiting=2), budget_gb=8.5)
    pool.get("a")
    pool.get("b")
    with pytest.raises(ModelLoadError, match="try again in a minute"):
        pool.get(EMBEDDED)
    assert pool.loaded_names() == ["a", "b"]


def test_the_embedded_model_answers_while_the_default_loads():
    catalog = Catalog([ModelEntry(EMBEDDED, "Embedded", {"dalle": None}), ModelEntry("mini", "DALL·E Mini", {})],
                      "mini", "this is a Hugging Face Space")
    release = threading.Event()

    def load(entry):
        if entry.name == "mini":
            assert release.wait(60)
        return FakeScheduler(entry.name)

    pool = ModelPool(catalog, load)
    loading = pool.load_default_in_background()
    assert pool.active_default() == EMBEDDED
    assert pool.default_status() == ("DALL·E Mini is loading, because this is a Hugging Face Space; "
                                     "until it is ready the embedded model answers.")
    release.set()
    loading.join(60)
    assert pool.active_default() == "mini" and "Model: DALL·E Mini" in pool.default_status()


def test_a_default_that_fails_to_load_leaves_the_embedded_model_answering():
    catalog = Catalog([ModelEntry(EMBEDDED, "Embedded", {"dalle": None}), ModelEntry("mini", "DALL·E Mini", {})],
                      "mini")

    online = threading.Event()

    def load(entry):
        if not online.is_set():
            raise OSError("the hub could not be reached")
        return FakeScheduler(entry.name)

    pool = ModelPool(catalog, load)
    pool.load_default_in_background().join(60)
    assert pool.active_default() == EMBEDDED
    assert "could not be loaded" in pool.default_status() and "hub could not be reached" in pool.default_status()
    online.set()  # a visitor who chooses it later loads it: from then on it answers by default
    pool.get("mini")
    assert pool.active_default() == "mini" and pool.default_status() == "Model: DALL·E Mini."


# --- what the embedded model understands ------------------------------------------------------


def test_unknown_words_replace_the_text_length_notice_for_the_embedded_model():
    catalog = Catalog.from_env({"DALLE_APP_DEFAULT_MODEL": "embedded"}, lambda ref, kind: (True, "here"))
    notices = catalog.text_notices(EMBEDDED, " an armchair in the shape of an avocado", truncated=True)
    assert notices == [notices[0]] and notices[0].startswith(
        "The embedded model does not know: armchair, in, shape, avocado.")
    assert catalog.text_notices(EMBEDDED, " a red square above a blue circle", truncated=False) == []
    assert catalog.text_notices(EMBEDDED, " a red square above a blue circle", truncated=True) == [TEXT_CUT_NOTICE]
    # DALL·E Mini learned from open captions: only a real cut is reported.
    assert catalog.text_notices("mini", " an armchair in the shape of an avocado", truncated=False) == []
    assert catalog.text_notices("mini", " an armchair", truncated=True) == [TEXT_CUT_NOTICE]


def test_the_embedded_model_names_the_words_it_does_not_know(tmp_path, monkeypatch, capsys):
    """The real embedded model, through the command line."""
    monkeypatch.delenv("DALLE_APP_ALLOWED_MODELS", raising=False)
    code = cli.main(["an armchair in the shape of an avocado", "--model", "embedded", "--images", "1",
                     "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert code == 0
    assert "note: The embedded model does not know: armchair, in, shape, avocado." in err
    assert "longer than the model's text length" not in err


# --- the machine --------------------------------------------------------------------------------


def test_memory_budget_from_the_environment_or_the_machine():
    assert hardware.memory_budget_gb({"DALLE_APP_MEMORY_GB": "12.5"}) == 12.5
    for bad in ("0", "-3", "lots", "inf"):
        with pytest.raises(ValueError, match="DALLE_APP_MEMORY_GB must be a number of GB greater than 0"):
            hardware.memory_budget_gb({"DALLE_APP_MEMORY_GB": bad})
    # The tests run JAX on the CPU: the default is a share of the machine's RAM.
    assert hardware.memory_budget_gb({}) == pytest.approx(hardware.MEMORY_SHARE * hardware.machine_memory_gb())


def test_a_gpu_that_jax_cannot_use_is_reported(monkeypatch):
    monkeypatch.setattr(hardware, "nvidia_gpu_visible", lambda: True)
    assert "requirements-gpu.txt" in hardware.gpu_backend_warning()  # the tests run CPU JAX
    monkeypatch.setattr(hardware, "nvidia_gpu_visible", lambda: False)
    assert hardware.gpu_backend_warning() is None


def test_compiled_programs_persist_in_the_spaces_storage_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "PERSISTENT_STORAGE", tmp_path / "data")
    assert hardware.compilation_cache_dir() == Path.home() / ".cache" / "dalle_app" / "jax"
    (tmp_path / "data").mkdir()
    assert hardware.compilation_cache_dir() == tmp_path / "data" / "dalle_app" / "jax"


# --- command-line exit codes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["x", "--model", "a+b+c+d"], {}, "--model 'a+b+c+d': expected dalle[+vqgan[+clip]]"),
        (["x", "--images", "2.5"], {}, "num_images must be a whole number"),
        (["x", "--model", "nope"], {}, "nope"),
        (["x", "--out", "."], {}, "is a folder"),
        (["x"], {"DALLE_APP_ALLOWED_MODELS": "nope"}, "DALLE_APP_ALLOWED_MODELS names 'nope'"),
        (["x"], {"DALLE_APP_DEFAULT_MODEL": "nope"}, "default model 'nope' is not configured"),
    ],
)
def test_every_invalid_option_exits_with_2(args, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["x", "--images"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip().endswith(__version__)


# --- the page ---------------------------------------------------------------------------------


def loading_space_handlers(tmp_path, release: threading.Event):
    from dalle_app.ui import Handlers

    catalog = Catalog.from_env({"SPACE_ID": "a/b"}, lambda ref, kind: (True, "here"), accelerator_gb=no_accelerator)

    def load(entry):
        if entry.name == "mini":
            assert release.wait(60)
        return FakeScheduler(entry.name)

    pool = ModelPool(catalog, load)
    return Handlers(catalog, pool, grid_dir=tmp_path, machine_warning="A GPU is attached but JAX runs on the CPU"), pool


def test_the_page_follows_the_default_model_while_it_loads_and_once_it_is_ready(tmp_path):
    release = threading.Event()
    h, pool = loading_space_handlers(tmp_path, release)
    loading = pool.load_default_in_background()
    heading, line, menu, *_, examples, timer = h.page_opened()
    assert heading == "# Embedded default" and menu.value == EMBEDDED and timer.active
    assert line.startswith("DALL·E Mini is loading, because this is a Hugging Face Space")
    assert "draws coloured shapes" in line and "choose DALL·E Mini or DALL·E Mega under **Advanced settings" in line
    assert "⚠️ A GPU is attached but JAX runs on the CPU" in line
    assert examples.raw_samples[0] == ["a red square above a blue circle"]
    assert h.status_tick()[2].value is None  # still loading: the menu is left as the user set it
    release.set()
    loading.join(60)
    heading, line, menu = h.status_tick()
    assert heading == "# DALL·E Mini" and menu.value == "mini" and not h.timer_state().active
    assert line.startswith("Model: DALL·E Mini, because this is a Hugging Face Space.")
    assert "coloured shapes" not in line


def test_generate_lays_out_the_gallery_and_picks_the_seed(tmp_path):
    from dalle_app.ui import Handlers

    for count, shape in ((9, (3, 3)), (16, (4, 4)), (4, (2, 2)), (1, (1, 1)), (10, (4, 3))):
        _, gallery, _ = Handlers.before_generate(count, 0, True)
        assert (gallery.columns, gallery.rows) == shape
    assert Handlers.before_generate(9, 1234, True)[2] == -1  # randomize: a new seed every run
    assert Handlers.before_generate(9, 1234, False)[2] == 1234  # reuse the seed shown
    assert Handlers.seed_used({"parameters": {"seed": 77}, "status": "done"}) == 77


def test_a_queued_request_is_told_its_place_and_an_estimate(tmp_path):
    release = threading.Event()
    release.set()
    h, _ = loading_space_handlers(tmp_path, release)
    assert h.queue_message("mini", 0) == "Starting"
    assert h.queue_message("mini", 2) == "Queued: 2 request(s) ahead"  # no request timed yet
    h._request_seconds["mini"] = 6.2
    assert h.queue_message("mini", 2) == "Queued: 2 request(s) ahead, about 13 s"


def test_the_gallery_keeps_gradios_share_and_download_buttons(tmp_path):
    import gradio as gr

    from dalle_app.ui import build_app

    release = threading.Event()
    release.set()
    h, pool = loading_space_handlers(tmp_path, release)
    demo = build_app(h.catalog, pool, handlers=h)
    gallery = next(b for b in demo.blocks.values() if isinstance(b, gr.Gallery))
    assert {"share", "download", "fullscreen"} <= set(gallery.buttons)
    assert demo.title == "DALL·E Mini · dalle_app"  # nothing loads in the background: mini answers
