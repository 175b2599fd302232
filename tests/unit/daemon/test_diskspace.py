"""Disk condition, what counts as disk full, the counts kept for later, file modes."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.diskspace import Backlog, DiskWatch, Unanswered, is_disk_full
from spark_slurm.daemon.filemodes import FileModes
from spark_slurm.daemon.service import visible_to
from spark_slurm.daemon.tally import Tally
from spark_slurm.errors import ConfigError, DiskFull


class FakeFs:
    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: str) -> Any:
        return SimpleNamespace(f_bavail=self.free // 4096, f_frsize=4096, f_blocks=1000)


def test_low_then_full_then_back(tmp_path: Path) -> None:
    fs = FakeFs(100 << 20)
    watch = DiskWatch([tmp_path, tmp_path / "sub" / "ledger.db"], 64 << 20, statvfs=fs)
    assert len(watch.paths) == 1  # one filesystem, measured once
    assert watch.check() is False and watch.healthy and watch.problems() == []
    fs.free = 10 << 20
    assert watch.check() is False and not watch.healthy and not watch.full
    assert watch.problems()[0].startswith("disk low:")
    watch.mark_full("database or disk is full")
    watch.mark_full("again")  # one event, the first reason kept
    assert watch.full and watch.full_events == 1
    assert watch.report()["full"] is True and watch.report()["low"] is True
    fs.free = 63 << 20
    assert watch.check() is False and watch.full  # back only above the threshold
    fs.free = 65 << 20
    assert watch.check() is True and watch.healthy and not watch.full
    assert watch.check() is False  # the recovery is reported once


@pytest.mark.parametrize("exc,full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (sqlite3.OperationalError("database or disk is full"), True),
    (DiskFull("the disk is full"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (sqlite3.OperationalError("database is locked"), False),
    (ValueError("x"), False),
])
def test_what_counts_as_disk_full(exc: BaseException, full: bool) -> None:
    assert is_disk_full(exc) is full
    try:
        raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped) is full


def test_tally_counts_drains_and_restores() -> None:
    clock = ManualClock()
    tally = Tally("ops", clock=clock)
    tally.add(5, "disk-full", "cap")
    clock.advance(1)
    tally.add(5, "disk-full", "cap")
    tally.add(5, "disk-full", "status")
    [c] = tally.drain()
    assert (c.uid, c.code, c.count, c.detail) == (5, "disk-full", 3, {"cap": 2, "status": 1})
    assert c.last_ns - c.first_ns == 1_000_000_000
    assert tally.drain() == []
    tally.restore([c])
    tally.add(5, "disk-full", "cap")
    [again] = tally.drain()
    assert again.count == 4 and again.first_ns == c.first_ns
    assert tally.totals() == {"cap": 3, "status": 1}  # totals never drain


def test_the_backlog_is_bounded_and_keeps_order() -> None:
    backlog = Backlog(limit=2)
    for i in range(3):
        backlog.add(Unanswered(i, 0, "root", f"id{i}", {"op": "prolog"}))
    assert backlog.dropped == 1
    items = backlog.take()
    assert [i.request_id for i in items] == ["id1", "id2"] and len(backlog) == 0
    backlog.put_back(items)
    assert [i.request_id for i in backlog.take()] == ["id1", "id2"]


def test_status_is_cut_to_the_callers_own_jobs() -> None:
    status: dict[str, Any] = {"jobs": [{"job_id": "1", "uid": 7}, {"job_id": "2", "uid": 8}],
              "gpus": [{"index": 0, "job": "1"}, {"index": 1, "job": "2"},
                       {"index": 2, "job": None}],
              "startup": {"orphans": ["2"], "kept": ["1", "2"], "reconciled": [0]}}
    mine = visible_to(status, 7)
    assert mine["jobs"] == [{"job_id": "1", "uid": 7}]
    assert mine["gpus"] == [{"index": 0, "job": "1"}, {"index": 1, "job": None, "held": True},
                            {"index": 2, "job": None}]
    assert mine["startup"] == {"orphans": [], "kept": ["1"], "reconciled": [0]}
    assert status["jobs"][1]["job_id"] == "2"  # the original is untouched


def test_file_modes_ignore_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        modes = FileModes()
        modes.directory(tmp_path / "state")
        modes.create(tmp_path / "state" / "journal.jsonl")
        modes.ledger(tmp_path / "state" / "ledger.db")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for name in ("journal.jsonl", "ledger.db"):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600
    group = FileModes.for_group(str(os.getgid()))
    assert (group.file_mode, group.dir_mode) == (0o640, 0o750)
    with pytest.raises(ConfigError, match="no such group"):
        FileModes.for_group("no-such-group-here")
