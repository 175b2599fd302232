"""Path 3, facility correlation: did the rack's real power move the way the GPUs say?

After a change, once the post-change window has elapsed, the rack's mean power
(Karman) after vs before is compared with the change the GPUs' own telemetry
implies over the same windows. The rack meter sees the whole node, so the
expected change is summed over every GPU on the node, not only the acting
job's: two actions close together must not flag each other. The first half
of the after window is settling time (power follows a cap with a lag) and is
left out of both means. Within
tolerance the action is `correlated`, otherwise `flagged`; without a stream it
is `unavailable` with the reason. The
result is a `facility` PER whose `ref` links it to the action. It runs on its own
thread, so no caller ever waits for it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.daemon.contracts import FacilityStream, PolicyLike, ReceiptLike
from spark_slurm.daemon.writer import LedgerWriter

log = logging.getLogger("sparkd.facility")

_S = 1_000_000_000


class WindowSource(Protocol):
    @property
    def indices(self) -> tuple[int, ...]: ...

    def window(self, index: int, t0_ns: int, t1_ns: int) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Job:
    kind: str
    ref: ReceiptLike
    gpus: tuple[int, ...]
    changed_ns: int
    job_id: str | None
    # (before, after, tolerance mW, tolerance %) in force when the change was made: a
    # policy reloaded while the follow-up waits must not move a window it is waiting for.
    windows: tuple[int, int, int, int]


def _mean_power(samples: Any) -> int | None:
    values = [s.power_mw for s in samples]
    return sum(values) // len(values) if values else None


def _window_body(w: Any) -> dict[str, int]:
    return {"mean_mw": int(w.mean_mw), "min_mw": int(w.min_mw), "max_mw": int(w.max_mw),
            "samples": int(w.samples), "gaps": int(w.gaps)}


class FacilityFollower:
    """Schedules and writes the facility follow-up PER of each action."""

    def __init__(self, *, node: str, writer: LedgerWriter, policy: Callable[[], PolicyLike],
                 stream: FacilityStream | None, telemetry: WindowSource | None,
                 index_of: Callable[[int], int], clock: Clock = SYSTEM_CLOCK,
                 unavailable_reason: str = "no Karman endpoint configured",
                 count: Callable[[str], None] | None = None) -> None:
        self.node = node
        self.writer = writer
        self.policy = policy
        self.stream = stream
        self.telemetry = telemetry
        self.index_of = index_of
        self.clock = clock
        self.unavailable_reason = unavailable_reason
        self.count = count or (lambda _v: None)
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="facility", daemon=True)

    def _windows(self) -> tuple[int, int, int, int]:
        f = getattr(self.policy().settings, "facility", None)
        before = int(float(getattr(f, "before_s", 10.0)) * _S)
        after = int(float(getattr(f, "after_s", 10.0)) * _S)
        tol_w = int(getattr(f, "tolerance_w", 500))
        tol_pct = int(getattr(f, "tolerance_pct", 25))
        return before, after, tol_w * 1000, tol_pct

    def start(self) -> None:
        self._thread.start()

    def schedule(self, kind: str, ref: ReceiptLike, gpus: list[int], changed_ns: int,
                 job_id: str | None = None) -> None:
        """Called after an action's PER is durable; the follow-up comes after its window."""
        changed = changed_ns or self.clock.now_ns()
        windows = self._windows()
        after = windows[1]
        due = time.monotonic() + max(0.0, (changed + after - self.clock.now_ns()) / _S) + 0.2
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq),
                                        _Job(kind, ref, tuple(gpus), changed, job_id, windows)))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        """Write what is still pending as `unavailable` (the window did not elapse)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            left = [job for _, _, job in self._heap]
            self._heap.clear()
        self._thread.join(timeout=5)
        for job in left:
            self._write(job, "unavailable", "sparkd stopped before the window elapsed")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                _, _, job = heapq.heappop(self._heap)
            try:
                self._correlate(job)
            except Exception:
                log.exception("facility follow-up of seq %s failed", job.ref.seq)

    def _gpu_delta(self, job: _Job, before: int, after: int) -> tuple[int, list[int]] | None:
        """Node-wide GPU power change over the windows, and the GPUs it could not see.

        The job's own GPUs must have telemetry (else None: unavailable); another
        GPU without samples (e.g. its driver crashed) is left out and listed.
        """
        if self.telemetry is None:
            return None
        own = {self.index_of(minor) for minor in job.gpus}
        total, unseen = 0, []
        for idx in self.telemetry.indices:
            pre = _mean_power(self.telemetry.window(idx, job.changed_ns - before, job.changed_ns))
            post = _mean_power(self.telemetry.window(idx, job.changed_ns + after // 2,
                                                     job.changed_ns + after))
            if pre is None or post is None:
                if idx in own:
                    return None
                unseen.append(idx)
                continue
            total += post - pre
        return total, unseen

    def _correlate(self, job: _Job) -> None:
        before, after, tol_mw, tol_pct = job.windows
        settings = getattr(self.policy().settings, "facility", None)
        if not getattr(settings, "enabled", True):
            self._write(job, "unavailable", "facility correlation is disabled by the policy")
            return
        if self.stream is None:
            self._write(job, "unavailable", self.unavailable_reason)
            return
        pre = self.stream.window(job.changed_ns - before, job.changed_ns)
        post = self.stream.window(job.changed_ns + after // 2, job.changed_ns + after)
        node_delta = self._gpu_delta(job, before, after)
        extra: dict[str, Any] = {"window": {"before": _window_body(pre),
                                            "after": _window_body(post)},
                                 "window_ns": {"before": before, "after": after,
                                               "settle": after // 2}}
        if pre.samples == 0 or post.samples == 0:
            self._write(job, "unavailable", "no Karman frames in the window", extra)
            return
        if node_delta is None:
            self._write(job, "unavailable", "no GPU telemetry in the window", extra)
            return
        expected, unseen = node_delta
        if unseen:
            extra["gpus_unsampled"] = unseen
        delta = int(post.mean_mw) - int(pre.mean_mw)
        tolerance = max(tol_mw, abs(expected) * tol_pct // 100)
        verdict = "correlated" if abs(delta - expected) <= tolerance else "flagged"
        extra.update(delta_mw=delta, expected_delta_mw=expected, tolerance_mw=tolerance)
        self._write(job, verdict, None, extra)

    def _write(self, job: _Job, verdict: str, reason: str | None,
               extra: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {"v": 1, "node": self.node, "source": "automation",
                                "ref": {"seq": job.ref.seq, "hash": job.ref.hash},
                                "ref_kind": job.kind, "gpus": list(job.gpus),
                                "changed_ns": job.changed_ns, "verdict": verdict}
        if job.job_id is not None:
            body["job_id"] = job.job_id
        if reason is not None:
            body["reason"] = reason
        body.update(extra or {})
        self.writer.submit("facility", body)
        self.count(verdict)
