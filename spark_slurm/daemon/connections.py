"""Who may hold a connection to sparkd: a reserve for the scheduler, quotas for users.

The socket is open to every local user, and every connection costs a thread. A
user holding hundreds of idle connections would otherwise take every slot and
the prolog of the next job would be turned away, which drains the node. So:
- `reserved` of the `max_connections` slots are only for root and the
  SlurmUser (the prolog, the epilog, the health check): a user can never take
  them;
- each other uid may hold at most `per_uid` connections at once;
- each other uid has a token bucket (`rate_per_s`, `burst`) that every new
  connection and every request spends, so a user reconnecting in a loop (or
  spinning requests) is turned away instead of monopolising the accept thread;
- `idle_timeout_s` bounds the time from connecting (or from the last reply) to
  a complete request line; trickling bytes does not extend it.
A connection turned away gets one `busy` line and is closed; nothing was read,
so it is counted (metrics, and one summary PER per uid and flush), not recorded
one by one. Root and the SlurmUser are never rate limited.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.daemon.tally import Tally


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The `connections` section of sparkd.yaml."""

    max_connections: int = 256
    reserved: int = 32
    per_uid: int = 8
    rate_per_s: float = 20.0
    burst: int = 40
    idle_timeout_s: float = 10.0
    refuse_per_s: float = 2000.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp_ns: int


class ConnectionGate:
    """Admits or turns away connections and requests; thread-safe, one per server."""

    def __init__(self, limits: ConnectionLimits, privileged: Callable[[int], bool], *,
                 clock: Clock = SYSTEM_CLOCK, tally: Tally | None = None) -> None:
        self.limits = limits
        self.privileged = privileged
        self._clock = clock
        self._lock = threading.Lock()
        self._open = 0
        self._by_uid: dict[int, int] = {}
        self._buckets: dict[int, _Bucket] = {}
        self.tally = tally if tally is not None else Tally("reasons", clock=clock)
        self.timed_out = 0
        self._refusals = _Bucket(float(max(1, limits.refuse_per_s) / 10), clock.monotonic_ns())

    @property
    def open(self) -> int:
        with self._lock:
            return self._open

    def refused(self) -> dict[str, int]:
        """Connections and requests turned away since start, by reason."""
        return self.tally.totals()

    def _spend(self, uid: int) -> float | None:
        """Take a token from a user's bucket; the wait in seconds when there is none."""
        rate, burst = self.limits.rate_per_s, self.limits.burst
        if rate <= 0 or burst <= 0:
            return None
        now = self._clock.monotonic_ns()
        b = self._buckets.get(uid)
        if b is None:
            b = self._buckets[uid] = _Bucket(float(burst), now)
        else:
            b.tokens = min(float(burst), b.tokens + (now - b.stamp_ns) / 1e9 * rate)
            b.stamp_ns = now
        if b.tokens < 1:
            return (1 - b.tokens) / rate
        b.tokens -= 1
        return None

    def admit(self, uid: int) -> str | None:
        """Open a slot for a new connection from `uid`; None, or why it is turned away."""
        privileged = self.privileged(uid)
        with self._lock:
            limit = self.limits.max_connections
            if not privileged:
                limit -= self.limits.reserved
            if self._open >= limit:
                reason, message = "pool", (
                    f"all {limit} connection slots open to uid {uid} are in use")
            elif not privileged and self._by_uid.get(uid, 0) >= self.limits.per_uid:
                reason, message = "per-uid", (
                    f"uid {uid} already holds {self.limits.per_uid} connections (the limit)")
            elif not privileged and (wait := self._spend(uid)) is not None:
                reason, message = "rate", (
                    f"uid {uid} is over its rate of {self.limits.rate_per_s:g} connections "
                    f"and requests per second; retry in {max(wait, 0.05):.2f} s")
            else:
                self._open += 1
                self._by_uid[uid] = self._by_uid.get(uid, 0) + 1
                return None
        self.tally.add(uid, "busy", reason)
        return message

    def refusal_pause(self) -> float:
        """After turning a connection away: seconds to stop accepting users' connections,
        once they are turned away faster than `refuse_per_s` (0: go on)."""
        rate = self.limits.refuse_per_s
        if rate <= 0:
            return 0.0
        with self._lock:
            b, now = self._refusals, self._clock.monotonic_ns()
            b.tokens = min(rate / 10, b.tokens + (now - b.stamp_ns) / 1e9 * rate)  # 0.1 s
            b.stamp_ns = now
            b.tokens -= 1
            return 0.0 if b.tokens >= 0 else max(0.01, -b.tokens / rate)

    def request(self, uid: int) -> str | None:
        """A request on an open connection: None, or why it is turned away (rate)."""
        if self.privileged(uid):
            return None
        with self._lock:
            wait = self._spend(uid)
        if wait is None:
            return None
        self.tally.add(uid, "busy", "rate")
        return (f"uid {uid} is over its rate of {self.limits.rate_per_s:g} connections and "
                f"requests per second; retry in {max(wait, 0.05):.2f} s")

    def timeout(self, uid: int, partial: bool) -> None:
        """A connection closed for sending no complete line within the idle timeout.

        Counted for every uid; a user's is also tallied (an idle or trickling
        connection that held a slot is the hog's pattern)."""
        with self._lock:
            self.timed_out += 1
        if not self.privileged(uid):
            self.tally.add(uid, "busy", "partial-timeout" if partial else "idle-timeout")

    def release(self, uid: int) -> None:
        """The connection from `uid` has closed."""
        with self._lock:
            self._open -= 1
            left = self._by_uid.get(uid, 0) - 1
            if left > 0:
                self._by_uid[uid] = left
            else:
                self._by_uid.pop(uid, None)
            bucket = self._buckets.get(uid)
            if left <= 0 and bucket is not None:
                refill = (self._clock.monotonic_ns() - bucket.stamp_ns) / 1e9 \
                    * self.limits.rate_per_s
                if bucket.tokens + refill >= self.limits.burst:
                    del self._buckets[uid]  # full again: forgetting it changes nothing
