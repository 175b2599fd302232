"""A per-uid budget for refused requests, so one local user cannot flood the ledger.

The socket is open to every local user (that is how owners lower their own
job's cap), and every refusal is a `reject` PER with an fsync behind it, so a
loop of junk or forbidden requests would otherwise cost disk, fsyncs and, for a
`cap`, a job-context lookup each. Each non-scheduler uid has a token bucket:
every refusal takes a token, tokens come back at `rate_per_s` up to `burst`.
While a uid has none left, its requests are answered `rate-limited` at once
(nothing looked up, nothing changed) and only counted; the counts are written
as one `reject` PER per uid (`code: rate-limited`, with the count, the first and
last time and the ops) at the next flush, so the ledger still accounts for
every request. Requests that succeed take no token: an owner adjusting their
own job is never limited. Root and the SlurmUser are never limited.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from spark_slurm.clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True, slots=True)
class Suppressed:
    """The requests of one uid answered `rate-limited` since the last flush."""

    uid: int
    count: int
    first_ns: int
    last_ns: int
    ops: dict[str, int]


@dataclass
class _Bucket:
    tokens: float
    stamp_ns: int
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class RefusalLimiter:
    """Token buckets of refusals per uid; thread-safe (one per daemon)."""

    def __init__(self, rate_per_s: float, burst: int, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[int, _Bucket] = {}
        self._suppressed_total = 0

    @property
    def suppressed_total(self) -> int:
        """Requests answered `rate-limited` since start (a Prometheus counter)."""
        with self._lock:
            return self._suppressed_total

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and self.burst > 0

    @property
    def tracked(self) -> int:
        """How many uids have a bucket (idle full ones are dropped at each drain)."""
        with self._lock:
            return len(self._buckets)

    def _bucket(self, uid: int) -> _Bucket:
        now = self._clock.monotonic_ns()
        b = self._buckets.get(uid)
        if b is None:
            b = self._buckets[uid] = _Bucket(float(self.burst), now)
        else:
            b.tokens = min(float(self.burst),
                           b.tokens + (now - b.stamp_ns) / 1e9 * self.rate_per_s)
            b.stamp_ns = now
        return b

    def retry_after(self, uid: int) -> float | None:
        """Seconds until `uid` may be refused again, or None when it has budget."""
        if not self.enabled:
            return None
        with self._lock:
            b = self._bucket(uid)
            return None if b.tokens >= 1 else (1 - b.tokens) / self.rate_per_s

    def refused(self, uid: int) -> None:
        """Spend one token for a refusal that was recorded."""
        if not self.enabled:
            return
        with self._lock:
            b = self._bucket(uid)
            b.tokens = max(0.0, b.tokens - 1)

    def suppress(self, uid: int, op: str) -> None:
        """Count a request answered `rate-limited` (recorded at the next drain)."""
        now = self._clock.now_ns()
        with self._lock:
            b = self._bucket(uid)
            if b.count == 0:
                b.first_ns = now
            b.count += 1
            b.last_ns = now
            b.ops[op] = b.ops.get(op, 0) + 1
            self._suppressed_total += 1

    def drain(self) -> list[Suppressed]:
        """Take every uid's counts (to be recorded) and forget idle, full buckets."""
        with self._lock:
            out = [Suppressed(uid, b.count, b.first_ns, b.last_ns, dict(sorted(b.ops.items())))
                   for uid, b in sorted(self._buckets.items()) if b.count]
            for uid in list(self._buckets):
                b = self._bucket(uid)
                b.count, b.ops = 0, {}
                if b.tokens >= self.burst:
                    del self._buckets[uid]
            return out

    def restore(self, items: list[Suppressed]) -> None:
        """Put counts back that could not be recorded, so the next drain retries them."""
        with self._lock:
            for s in items:
                b = self._bucket(s.uid)
                b.first_ns = min(b.first_ns, s.first_ns) if b.count else s.first_ns
                b.last_ns = max(b.last_ns, s.last_ns)
                b.count += s.count
                for op, n in s.ops.items():
                    b.ops[op] = b.ops.get(op, 0) + n
