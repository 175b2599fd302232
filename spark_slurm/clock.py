"""Injectable time, so tests control it without monkeypatching."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Wall-clock time in Unix nanoseconds (recorded in PERs)."""
        ...

    def monotonic_ns(self) -> int:
        """Monotonic time for intervals and timeouts."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told; sleeping advances it."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        self._now = start_ns
        self._mono = 0

    def now_ns(self) -> int:
        return self._now

    def monotonic_ns(self) -> int:
        return self._mono

    def advance(self, seconds: float) -> None:
        step = int(seconds * 1_000_000_000)
        self._now += step
        self._mono += step

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
