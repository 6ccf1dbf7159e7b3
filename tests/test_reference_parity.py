"""Parity with the original implementations on reference checkpoints.

Runs over every folder in tests/fixtures/reference/ and, when $DALLE_APP_PARITY_DIR is set
(one directory, or several separated by the path separator), over every folder in those too:
the variable adds checkpoints, it never replaces the bundled ones. The kind comes from the
folder's name prefix (dallebart_, vqgan_, clip_); each kind's checks live in tests/parity/ as a
{quantity: check(folder)} table, and every applicable (folder, quantity) pair is one test.

A folder whose name has none of the prefixes, a parity directory that does not exist, and a
parity directory with no recognised folder are failures, never silent skips: a checkpoint that
was meant to be checked must not pass unchecked.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.parity import clip_checks, dallebart_model_checks, dallebart_text_checks, vqgan_checks

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
PARITY_DIR_VARIABLE = "DALLE_APP_PARITY_DIR"

CHECKS_BY_PREFIX = {
    "dallebart_": {**dallebart_text_checks.CHECKS, **dallebart_model_checks.CHECKS},
    "vqgan_": vqgan_checks.CHECKS,
    "clip_": clip_checks.CHECKS,
}

Check = Callable[[Path], None]


def _failure(message: str) -> Check:
    def fail(_folder: Path) -> None:
        pytest.fail(message, pytrace=False)

    return fail


def _kind(folder: Path) -> str | None:
    return next((p for p in CHECKS_BY_PREFIX if folder.name.startswith(p)), None)


def _folder_cases(folder: Path) -> list[tuple[str, Path, Check]]:
    prefix = _kind(folder)
    if prefix is None:
        return [(f"{folder.name}-unrecognised", folder, _failure(
            f"{folder} is not a reference folder this harness knows: its name must start with one "
            f"of {', '.join(CHECKS_BY_PREFIX)} (rename it, or move it out of the parity directory)"))]
    return [
        (f"{folder.name}-{name}", folder, check)
        for name, check in CHECKS_BY_PREFIX[prefix].items()
        if getattr(check, "applies", lambda f: True)(folder)
    ]


def _directory_cases(root: Path) -> list[tuple[str, Path, Check]]:
    if not root.is_dir():
        return [(f"{root.name}-missing", root, _failure(
            f"{PARITY_DIR_VARIABLE} names {root}, which is not a directory"))]
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not any(_kind(f) for f in folders):
        return [(f"{root.name}-empty", root, _failure(
            f"{root} holds no reference folder (dallebart_*, vqgan_*, clip_*): nothing to check"
            + (f"; it has {', '.join(f.name for f in folders)}" if folders else "")))]
    return [case for folder in folders for case in _folder_cases(folder)]


def parity_cases(extra: str | None) -> list[tuple[str, Path, Check]]:
    """(test id, folder, check) for the bundled folders plus every directory listed in `extra`."""
    roots = [FIXTURES] + [Path(p) for p in (extra or "").split(os.pathsep) if p]
    cases: list[tuple[str, Path, Check]] = []
    seen: set[str] = set()
    for root in dict.fromkeys(r.resolve() for r in roots):  # each directory once
        for test_id, folder, check in _directory_cases(root):
            if test_id in seen:  # same folder name in two directories: keep both, tell them apart
                test_id = f"{root.name}/{test_id}"
            seen.add(test_id)
            cases.append((test_id, folder, check))
    return cases


@pytest.mark.parametrize(
    ("folder", "check"),
    [pytest.param(folder, check, id=test_id)
     for test_id, folder, check in parity_cases(os.environ.get(PARITY_DIR_VARIABLE))],
)
def test_parity(folder: Path, check: Check) -> None:
    check(folder)


# ---- the harness itself: it must fail when there is nothing (or something unknown) to check


def _run(case: tuple[str, Path, Check]) -> None:
    _test_id, folder, check = case
    check(folder)


def test_the_variable_adds_folders_to_the_bundled_ones(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "vqgan_tiny_a", tmp_path / "vqgan_other")
    bundled = {test_id for test_id, _, _ in parity_cases(None)}
    ids = {test_id for test_id, _, _ in parity_cases(str(tmp_path))}
    assert bundled and bundled < ids
    assert {i for i in ids - bundled} == {f"vqgan_other-{name}" for name in vqgan_checks.CHECKS}


def test_an_unrecognised_folder_fails(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "vqgan_tiny_a", tmp_path / "vqgan_ok")
    (tmp_path / "my_checkpoint").mkdir()
    cases = [c for c in parity_cases(str(tmp_path)) if c[1].parent == tmp_path]
    unrecognised = [c for c in cases if c[1].name == "my_checkpoint"]
    assert len(unrecognised) == 1
    with pytest.raises(pytest.fail.Exception, match="my_checkpoint is not a reference folder"):
        _run(unrecognised[0])


@pytest.mark.parametrize("layout", ["empty", "only unrecognised", "missing"])
def test_a_parity_directory_without_reference_folders_fails(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "parity"
    if layout != "missing":
        root.mkdir()
    if layout == "only unrecognised":
        (root / "checkpoints").mkdir()
    extra = [c for c in parity_cases(str(root)) if c[1] == root]
    assert len(extra) == 1
    with pytest.raises(pytest.fail.Exception, match="no reference folder|not a directory"):
        _run(extra[0])


def test_a_dallebart_folder_without_expected_text_fails(tmp_path: Path) -> None:
    folder = tmp_path / "dallebart_no_text"
    shutil.copytree(FIXTURES / "dallebart_tiny_a", folder)
    (folder / "expected_text.json").unlink()
    cases = {c[0]: c for c in parity_cases(str(tmp_path)) if c[1] == folder}
    text_checks = [f"dallebart_no_text-{name}" for name in dallebart_text_checks.CHECKS]
    assert set(text_checks) <= set(cases), "the text checks must not be dropped"
    for test_id in text_checks:
        with pytest.raises(AssertionError, match="expected_text.json"):
            _run(cases[test_id])
