"""The daemon's duties between requests: watch the disk, catch up, ingest, resume.

Run from the main loop every fraction of a second: a statvfs of the ledger's
filesystems, a stat of job_submit.lua's denial spool (so refusals become PERs
within seconds) and of the hook's journal and reserve (the hook writes there
while sparkd runs when it could not get an answer recorded: ingest them then),
the node-recovery checks that are due, and, every `maintain_period_s`, the
summary PERs of what was counted rather than recorded. When the disk is healthy
again after being low or full, everything kept meanwhile is recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spark_slurm.daemon.diskspace import DiskWatch, is_disk_full
from spark_slurm.daemon.ingest import Ingestor
from spark_slurm.daemon.recovery import NodeRecovery
from spark_slurm.daemon.reserve import Reserve
from spark_slurm.daemon.service import Service
from spark_slurm.errors import SparkError

log = logging.getLogger("sparkd.upkeep")

SETTLE_S = 1.0  # default: a changed file must be unchanged this long before it is read


class Upkeep:
    """One per daemon; `turn()` from the main loop, `flush()` every maintain period."""

    def __init__(self, *, disk: DiskWatch, ingest: Callable[[], dict[str, Any]],
                 ingestor: Ingestor, service: Service, reserve: Reserve,
                 recovery: NodeRecovery | None, watched: Sequence[Path | None],
                 settle_s: float = SETTLE_S) -> None:
        self.disk = disk
        self.ingest = ingest
        self.ingestor = ingestor
        self.service = service
        self.reserve = reserve
        self.recovery = recovery
        self.watched = tuple(p for p in watched if p is not None)
        self.settle_s = settle_s
        self._seen = self._stamp()
        self._changed: tuple[Any, ...] | None = None  # a new stamp, and since when
        self._changed_at = 0.0

    def _stamp(self) -> tuple[Any, ...]:
        """What changes when the hook writes to its journal or reserve, or the shim
        appends a denial to the spool."""
        out: list[Any] = []
        for path in self.watched:
            try:
                st = path.stat()
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def turn(self) -> None:
        if self.disk.check():
            self.catch_up()
        if not self.disk.full:
            stamp = self._stamp()
            now = time.monotonic()
            if stamp == self._seen:
                self._changed = None
            elif stamp != self._changed:
                self._changed, self._changed_at = stamp, now  # let a burst of writes settle
            elif now - self._changed_at >= self.settle_s:
                self._seen = stamp
                self.ingest()
        if self.recovery is not None:
            self.recovery.tick()

    def catch_up(self) -> None:
        """Space is back: ingest the journal and reserve, record what the full disk kept
        off the ledger, set the reserve aside again, and resume the drained node."""
        log.info("disk healthy again: ingesting the journal, recording what was kept")
        self.ingest()
        self._seen = self._stamp()
        try:
            self.service.record_backlog(self.ingestor.seen_ids)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self.disk.mark_full(str(exc))
            return
        self.flush()
        try:
            self.reserve.ensure()
        except OSError as exc:
            log.warning("reserve journal not set aside yet: %s", exc)
        if self.recovery is not None:
            self.recovery.schedule()

    def flush(self) -> None:
        """Record what the limits and the full disk counted since the last flush."""
        try:
            self.service.flush_refusals()
        except Exception as exc:  # the counts are kept; tried again at the next flush
            if is_disk_full(exc):
                self.disk.mark_full(str(exc))
            elif not isinstance(exc, SparkError):
                raise
            log.error("cannot record counted requests yet: %s", exc)
