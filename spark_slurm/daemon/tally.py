"""Per-uid counts of requests that were answered but not recorded one by one.

Some answers cannot, or should not, each become a PER: a connection turned
away `busy` by a local user hammering the socket (one PER each would let them
flood the ledger), or a request answered `disk-full` while nothing could be
written. They are counted here, per uid and code, and the daemon writes one
summary `reject` PER per (uid, code) at each flush (`suppressed: {count,
first_ns, last_ns, <detail>}`), so every request is still accounted for. When
the flush cannot be written (the disk is still full) the counts go back and the
next flush tries again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from spark_slurm.clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True, slots=True)
class Count:
    """What one uid had counted under one code since the last drain."""

    uid: int
    code: str
    count: int
    first_ns: int
    last_ns: int
    detail: dict[str, int]


@dataclass(slots=True)
class _Entry:
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    detail: dict[str, int] = field(default_factory=dict)


class Tally:
    """Thread-safe counts keyed by (uid, code); `detail` names what was counted
    (e.g. the op, or why a connection was refused)."""

    def __init__(self, detail_key: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.detail_key = detail_key
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._totals: dict[str, int] = {}

    def add(self, uid: int, code: str, what: str) -> None:
        now = self._clock.now_ns()
        with self._lock:
            entry = self._entries.setdefault((uid, code), _Entry())
            if entry.count == 0:
                entry.first_ns = now
            entry.count += 1
            entry.last_ns = now
            entry.detail[what] = entry.detail.get(what, 0) + 1
            self._totals[what] = self._totals.get(what, 0) + 1

    def totals(self) -> dict[str, int]:
        """Everything ever counted, by detail (a Prometheus counter per value)."""
        with self._lock:
            return dict(self._totals)

    def drain(self) -> list[Count]:
        """Take every count (to be recorded); the tally starts empty again."""
        with self._lock:
            out = [Count(uid, code, e.count, e.first_ns, e.last_ns, dict(sorted(e.detail.items())))
                   for (uid, code), e in sorted(self._entries.items())]
            self._entries.clear()
            return out

    def restore(self, items: list[Count]) -> None:
        """Put back counts that could not be recorded, merged with any newer ones."""
        with self._lock:
            for c in items:
                entry = self._entries.setdefault((c.uid, c.code), _Entry())
                entry.first_ns = min(entry.first_ns, c.first_ns) if entry.count else c.first_ns
                entry.last_ns = max(entry.last_ns, c.last_ns)
                entry.count += c.count
                for what, n in c.detail.items():
                    entry.detail[what] = entry.detail.get(what, 0) + n
