"""The files a Space and an install read: requirements, README front matter, pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

from dalle_app import __version__, hub

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text(encoding="utf8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_gpu_requirements_are_the_apps_with_cuda_jax():
    cpu, gpu = requirement_lines("requirements.txt"), requirement_lines("requirements-gpu.txt")
    assert [line.replace("jax[cuda12]==", "jax==") for line in gpu] == cpu
    assert "jax[cuda12]==0.10.2" in gpu


def test_serving_requirements_hold_no_training_benchmark_or_test_packages():
    serving = {line.split("==")[0].lower() for line in requirement_lines("requirements.txt")}
    assert not serving & {"optax", "psutil", "gradio_client", "pytest", "playwright"}
    assert "-r requirements-train.txt" in requirement_lines("requirements-test.txt")
    assert "-r requirements-bench.txt" in requirement_lines("requirements-test.txt")


def test_the_space_preloads_exactly_what_the_app_reads_at_the_pinned_revisions():
    meta = front_matter()
    preload = {}
    for item in meta["preload_from_hub"]:
        repo, files, *revision = item.split()
        preload[repo] = (files.split(","), revision[0] if revision else None)
    expected = {}
    for name in ("mini", "vqgan", "clip"):
        reference = hub.NAMED_MODELS[name]
        files = hub.DOWNLOAD_FILES[reference.kind] + ([hub.WORD_FILE] if name == "mini" else [])
        expected[reference.repo_id] = (files, reference.revision)
    assert preload == expected
    assert hub.WORD_FILE_REPO == hub.NAMED_MODELS["mini"].repo_id
    # requirements.txt installs CPU JAX, so the suggested hardware is a CPU one (docs/space.md: GPU).
    assert meta["suggested_hardware"].startswith("cpu") and "jax==" in " ".join(requirement_lines("requirements.txt"))
    assert meta["sdk_version"] == next(line.split("==")[1] for line in requirement_lines("requirements.txt")
                                       if line.startswith("gradio=="))


def test_pyproject_lists_every_package_and_the_assets():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf8"))["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dalle_app").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"dalle_app.assets"}
    assert setuptools["package-dir"] == {"dalle_app.assets": "assets"}


def _can_build_offline() -> bool:
    """The build backend pyproject.toml names (setuptools ≥ 70.1, which builds wheels itself)."""
    try:
        from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_pip_install_gives_the_dalle_app_command(tmp_path):
    """`pip install .` into a fresh venv, offline: the packages this environment already has are
    shared through a .pth file, so pip must find every requirement satisfied without an index."""
    if not _can_build_offline():
        if os.environ.get("CI") == "true":
            pytest.fail("setuptools>=70.1 (requirements-test.txt) is needed to build the package")
        pytest.skip("setuptools>=70.1 from requirements-test.txt is not installed here")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "outer-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PIP_NO_INDEX": "1"}
    started = time.perf_counter()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-build-isolation", "--no-index",
         "--no-cache-dir", str(ROOT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    print(f"pip install . took {time.perf_counter() - started:.1f} s")
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    command = venv / "bin" / "dalle-app"
    shown = subprocess.run([command, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: dalle-app "), shown.stderr[-2000:]
    version = subprocess.run([command, "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert version.stdout.strip() == f"dalle-app {__version__}"
    # The embedded models are inside the installed package, not looked up in a clone.
    where = subprocess.run([python, "-c", "from dalle_app import hub; print(hub.EMBEDDED_FOLDERS['dalle'])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site) and (Path(where) / "flax_model.msgpack").is_file()
