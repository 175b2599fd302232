"""Background telemetry: a short ring buffer per GPU so pre-change windows are instant.

When a cap is about to change, the daemon needs the GPU's recent past (path 1,
"before"), not a fresh reading taken after it decided. The sampler keeps the
last `seconds` of readings per GPU at `rate_hz`; a failing GPU records its
error and the sampler keeps going for the others and for later recovery.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import GpuError, GpuNotFound, InputError
from spark_slurm.gpu.backend import GpuBackend, Sample


@dataclass(frozen=True, slots=True)
class SamplerStats:
    """Per-GPU sampling health: how many readings failed and the last error text."""

    samples: int
    failures: int
    last_error: str | None


class TelemetrySampler:
    """Samples every GPU of a backend at rate_hz into a bounded ring buffer each."""

    def __init__(self, gpu: GpuBackend, rate_hz: float = 10.0, seconds: float = 30.0,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if rate_hz <= 0 or seconds <= 0:
            raise InputError(f"sampler rate ({rate_hz} Hz) and span ({seconds} s) must be > 0")
        self._gpu = gpu
        self._clock = clock
        self._period = 1.0 / rate_hz
        self._indices = [d.index for d in gpu.devices()]
        size = max(1, round(rate_hz * seconds))
        self._rings: dict[int, deque[Sample]] = {i: deque(maxlen=size) for i in self._indices}
        self._counts = dict.fromkeys(self._indices, 0)
        self._failures = dict.fromkeys(self._indices, 0)
        self._errors: dict[int, str | None] = dict.fromkeys(self._indices)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample_once(self) -> None:
        """Take one reading of every GPU now (the thread calls this each period)."""
        for i in self._indices:
            try:
                s = self._gpu.sample(i)
            except GpuError as exc:
                with self._lock:
                    self._failures[i] += 1
                    self._errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            with self._lock:
                self._rings[i].append(s)
                self._counts[i] += 1
                self._errors[i] = None

    def _run(self) -> None:
        next_ns = self._clock.monotonic_ns()
        period_ns = int(self._period * 1_000_000_000)
        while not self._stop.is_set():
            self.sample_once()
            next_ns += period_ns
            now = self._clock.monotonic_ns()
            next_ns = max(next_ns, now)  # fell behind (slow backend): skip ticks, never burst
            # Never wait longer than one period, even if the clock does not move by itself.
            self._stop.wait(min(next_ns - now, period_ns) / 1_000_000_000)

    def start(self) -> TelemetrySampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def indices(self) -> tuple[int, ...]:
        """The backend device indices this sampler watches."""
        return tuple(self._indices)

    def _ring(self, index: int) -> deque[Sample]:
        ring = self._rings.get(index)
        if ring is None:
            raise GpuNotFound("not sampled (no such device)", index)
        return ring

    def latest(self, index: int) -> Sample | None:
        """The newest reading, or None before the first successful one."""
        with self._lock:
            ring = self._ring(index)
            return ring[-1] if ring else None

    def window(self, index: int, t0_ns: int, t1_ns: int) -> list[Sample]:
        """Readings with t0_ns <= time_ns <= t1_ns, oldest first."""
        with self._lock:
            return [s for s in self._ring(index) if t0_ns <= s.time_ns <= t1_ns]

    def stats(self, index: int) -> SamplerStats:
        with self._lock:
            self._ring(index)
            return SamplerStats(self._counts[index], self._failures[index], self._errors[index])

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
