"""Crash-safe small files: exact modes, never a half-written file, no leftovers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from spark_slurm.durable import create_new, replace_file


def test_create_new_sets_the_exact_mode_and_never_overwrites(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        create_new(tmp_path / "k", b"secret", 0o600)
        create_new(tmp_path / "p", b"public", 0o664)  # wider than the umask allows
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o664
    with pytest.raises(FileExistsError):
        create_new(tmp_path / "k", b"other", 0o600)
    assert (tmp_path / "k").read_bytes() == b"secret"


def test_replace_file_swaps_contents_and_mode_and_leaves_nothing_behind(
        tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")
    target.chmod(0o644)
    stale = tmp_path / f".state.{os.getpid()}.tmp"  # from a write that died half-way
    stale.write_bytes(b"half")
    replace_file(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
