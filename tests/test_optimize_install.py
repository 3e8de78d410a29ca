"""install_version: a version directory put in place whole, and (replacing one)
never missing, whichever way the swap is done here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convoy.optimize import install
from convoy.optimize.install import install_version

OLD = {"model.onnx": "old model", "tokenizer/vocab.txt": "old vocab", "only_old.txt": "x",
       "old_dir/a.txt": "a", "becomes_dir": "was a file"}  # fmt: skip
NEW = {"model.onnx": "new model", "tokenizer/vocab.txt": "new vocab",
       "tokenizer/merges.txt": "merges", "optimize_report.json": "{}",
       "becomes_dir/b.txt": "now a directory"}  # fmt: skip


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _read(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("swap", ["exchange", "entry by entry"])
def test_a_replaced_version_is_never_missing_and_ends_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    target, staging = tmp_path / "2", tmp_path / ".optimize-2-1"
    _write(target, OLD)
    _write(staging, NEW)
    (target / "link").symlink_to(target / "model.onnx")  # a stale symlink goes too
    if swap == "entry by entry":
        monkeypatch.setattr(install, "_renameat2", lambda: None)
    seen: list[dict[str, str]] = []

    def check(call: str) -> None:
        assert target.is_dir(), f"version 2 missing after {call}"
        seen.append(_read(target))

    def watched(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            finally:
                check(name)

        return step

    for name in ("rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, watched(name, getattr(os, name)))
    monkeypatch.setattr(install, "exchange", watched("exchange", install.exchange))
    install_version(staging, target)
    monkeypatch.undo()
    assert _read(target) == NEW
    assert not (target / "link").exists() and not os.path.lexists(target / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]
    assert seen, "the watch saw no step"
    if swap == "exchange":  # atomic: from the first step on, the new version whole
        assert all(state == NEW for state in seen), seen


def test_a_new_version_is_one_rename(tmp_path: Path) -> None:
    staging = tmp_path / ".optimize-3-1"
    _write(staging, NEW)
    install_version(staging, tmp_path / "3")
    assert _read(tmp_path / "3") == NEW and not staging.exists()


def test_exchange_swaps_two_directories_here(tmp_path: Path) -> None:
    """This machine's Linux and filesystem can exchange: the atomic path is the one taken."""
    if install._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert install.exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())
    with pytest.raises(FileNotFoundError):
        install.exchange(tmp_path / "a", tmp_path / "missing")
