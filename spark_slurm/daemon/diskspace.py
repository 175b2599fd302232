"""Disk full as a designed fail mode: see it coming, refuse before acting, catch up after.

sparkd watches the free space of the filesystems holding its ledger, state and
the hook's journal. Below `disk.min_free_mb` it reports itself unhealthy
(`status`, metrics), so the node health check drains the node *before* a write
fails; it keeps serving, since there is still room. Once a write has failed
for lack of space the condition is `full`: prologs and caps are refused before
any GPU is touched, every answer that could not be recorded is kept (a root or
SlurmUser request individually, a user's as a count), and the hook journals
what it could not get recorded into its pre-allocated reserve. When the free
space is back above the threshold, the daemon ingests the journal and the
reserve, records what it kept, and resumes the node it drained.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import DiskFull

log = logging.getLogger("sparkd.disk")

SQLITE_FULL = 13
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or what caused it) is the filesystem running out of space."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and (
                getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL
                or "database or disk is full" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


@dataclass(frozen=True, slots=True)
class Space:
    path: str
    free_bytes: int
    total_bytes: int


def _space(path: Path, statvfs: Callable[[str], Any]) -> Space:
    st = statvfs(str(path))
    return Space(str(path), int(st.f_bavail * st.f_frsize), int(st.f_blocks * st.f_frsize))


class DiskWatch:
    """The disk condition of one daemon: ok, low (below the threshold) or full."""

    def __init__(self, paths: Iterable[Path], min_free_bytes: int, *,
                 statvfs: Callable[[str], Any] = os.statvfs,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.paths = _one_per_filesystem(paths)
        self.min_free_bytes = min_free_bytes
        self._statvfs = statvfs
        self._clock = clock
        self._lock = threading.Lock()
        self._space: list[Space] = []
        self._full_since: int | None = None
        self._full_reason = ""
        self._low = False
        self.full_events = 0

    @property
    def full(self) -> bool:
        with self._lock:
            return self._full_since is not None

    @property
    def healthy(self) -> bool:
        with self._lock:
            return self._full_since is None and not self._low

    def mark_full(self, reason: str) -> None:
        """A write failed for lack of space: refuse actions until space is back."""
        with self._lock:
            if self._full_since is None:
                self._full_since = self._clock.now_ns()
                self._full_reason = reason
                self.full_events += 1
                log.error("disk full: %s; refusing prologs and caps until %d MiB are free",
                          reason, self.min_free_bytes >> 20)

    def check(self) -> bool:
        """Measure the free space now; True when the disk just became healthy again."""
        spaces = []
        for path in self.paths:
            try:
                spaces.append(_space(path, self._statvfs))
            except OSError as exc:
                log.warning("cannot stat filesystem of %s: %s", path, exc)
        low = any(s.free_bytes < self.min_free_bytes for s in spaces)
        with self._lock:
            was_healthy = self._full_since is None and not self._low
            self._space = spaces
            if low and not self._low:
                log.warning("disk space low: %s", _describe(spaces))
            self._low = low
            if not low and self._full_since is not None:
                log.info("disk space back (%s); catching up", _describe(spaces))
                self._full_since = None
                self._full_reason = ""
            return not was_healthy and not low

    def problems(self) -> list[str]:
        """Why the disk makes the daemon unhealthy (empty when it does not)."""
        with self._lock:
            out = []
            if self._full_since is not None:
                out.append(f"disk full: {self._full_reason}")
            for s in self._space:
                if s.free_bytes < self.min_free_bytes:
                    out.append(f"disk low: {s.path} has {s.free_bytes >> 10} KiB free, below "
                               f"disk.min_free_mb ({self.min_free_bytes >> 10} KiB)")
            return out

    def report(self) -> dict[str, Any]:
        """The `disk` part of `status`."""
        with self._lock:
            return {"min_free_bytes": self.min_free_bytes, "low": self._low,
                    "full": self._full_since is not None, "full_since_ns": self._full_since,
                    "filesystems": [{"path": s.path, "free_bytes": s.free_bytes,
                                     "total_bytes": s.total_bytes} for s in self._space]}

    def free(self) -> list[Space]:
        with self._lock:
            return list(self._space)


def _describe(spaces: list[Space]) -> str:
    return ", ".join(f"{s.path}: {s.free_bytes >> 10} KiB free" for s in spaces)


def _one_per_filesystem(paths: Iterable[Path]) -> list[Path]:
    """The existing directory nearest each path, one per filesystem (device)."""
    out: list[Path] = []
    devices: set[int] = set()
    for path in paths:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            dev = probe.stat().st_dev
        except OSError:
            continue
        if dev not in devices:
            devices.add(dev)
            out.append(probe if probe.is_dir() else probe.parent)
    return out


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A root/SlurmUser request answered `disk-full`, to be recorded once space is back."""

    time_ns: int
    uid: int
    user: str
    request_id: str | int | None
    request: dict[str, Any]


class Backlog:
    """The scheduler's requests that could not be recorded; bounded, oldest dropped
    (and counted) past `limit`."""

    def __init__(self, limit: int = 10_000) -> None:
        self._items: deque[Unanswered] = deque(maxlen=limit)
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, item: Unanswered) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)

    def take(self) -> list[Unanswered]:
        with self._lock:
            out = list(self._items)
            self._items.clear()
            return out

    def put_back(self, items: list[Unanswered]) -> None:
        with self._lock:
            self._items.extendleft(reversed(items))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
