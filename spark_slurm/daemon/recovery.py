"""After recovery, give back the node the project drained, and only that.

Two kinds of drain are ours. The health check (`slurm/spark-nhc-check`) drains
with a reason that starts with `recovery.reason_prefix` ("spark:"). And when
the hook exits non-zero (the daemon refused a prolog, was unreachable under
fail_closed, or could not record), slurmctld drains with its own generic
reason, "Prolog error" or "Epilog error", which says nothing about why; such a
drain is taken as ours only when sparkd holds evidence of a hook failure on
this node at that time (it answered the hook with a failure, or ingested a
journal entry the hook wrote when failing closed), within a window of the
drain's timestamp. Anything else (an admin's "maintenance", a Prolog error
with no failure of ours behind it) is left alone.

Checks run at start (after the journal is ingested), when the disk is healthy
again, and a few times after each hook failure (slurmctld drains shortly after
the hook exits), never while the daemon itself is unhealthy. Each resume is a
`node` PER (event `resume`) naming the reason it cleared and the evidence.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import SparkError
from spark_slurm.slurm.nodestate import NodeStatus, node_status, resume
from spark_slurm.slurm.runner import Runner

log = logging.getLogger("sparkd.recovery")

HOOK_REASONS = ("Prolog error", "Epilog error")
EVIDENCE_BEFORE_S = 5.0    # the drain's stamp has whole seconds: allow for rounding
EVIDENCE_AFTER_S = 300.0   # slurmctld drains once the hook's (bounded) run has ended
AFTER_FAILURE_S = (2.0, 10.0, 30.0, 90.0)
AFTER_RECOVERY_S = (0.0, 10.0, 60.0)

Commit = Callable[[str, dict[str, Any]], Any]


class NodeRecovery:
    """Decides whether this node's drain is ours and resumes it; one per daemon."""

    def __init__(self, *, node: str, runner: Runner, commit: Commit,
                 healthy: Callable[[], bool], prefix: str = "spark:",
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.node = node
        self.runner = runner
        self.commit = commit
        self.healthy = healthy
        self.prefix = prefix
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: deque[int] = deque(maxlen=1000)  # hook failures, wall ns
        self._due: list[float] = []  # monotonic seconds of scheduled checks
        self._running = False
        self.resumed = 0

    def note_failure(self, time_ns: int) -> None:
        """The hook failed on this node at `time_ns` (so Slurm may drain it)."""
        with self._lock:
            self._failures.append(time_ns)
        self.schedule(AFTER_FAILURE_S)

    def schedule(self, delays: tuple[float, ...] = AFTER_RECOVERY_S) -> None:
        now = self._clock.monotonic_ns() / 1e9
        with self._lock:
            self._due = sorted({*self._due, *(now + d for d in delays)})

    def tick(self) -> None:
        """Run a due check in the background (called from the daemon's main loop)."""
        now = self._clock.monotonic_ns() / 1e9
        with self._lock:
            if self._running or not self._due or self._due[0] > now:
                return
            while self._due and self._due[0] <= now:
                self._due.pop(0)
            self._running = True
        threading.Thread(target=self._run, name="node-recovery", daemon=True).start()

    def _run(self) -> None:
        try:
            self.check()
        except Exception:
            log.exception("node recovery check failed")
        finally:
            with self._lock:
                self._running = False

    def check(self) -> str | None:
        """Resume the node if it is drained for a reason of ours; the reason cleared."""
        if not self.healthy():
            return None
        try:
            status = node_status(self.runner, self.node)
        except SparkError as exc:
            log.warning("cannot read node %s from slurmctld: %s", self.node, exc)
            return None
        if not status.drained:
            return None
        why, evidence = self.ours(status)
        if why is None:
            log.info("node %s is drained (%r): not ours, left alone", self.node, status.reason)
            return None
        try:
            resume(self.runner, self.node)
        except SparkError as exc:
            log.error("cannot resume node %s: %s", self.node, exc)
            return None
        self.resumed += 1
        body: dict[str, Any] = {
            "v": 1, "node": self.node, "event": "resume", "source": "automation",
            "authority": "automation:recovery", "state": status.state,
            "reason": status.reason, "why": why,
            "requester": {"uid": 0, "user": "sparkd", "role": "automation"}}
        if status.reason_time_s is not None:
            body["drained_ns"] = int(status.reason_time_s) * 1_000_000_000
        if evidence is not None:
            body["evidence_ns"] = evidence
        try:
            self.commit("node", body)
        except Exception as exc:  # resumed all the same; the log says so
            log.error("node %s resumed, but its PER could not be written: %s", self.node, exc)
        log.info("node %s resumed (was drained: %r; %s)", self.node, status.reason, why)
        return status.reason

    def ours(self, status: NodeStatus) -> tuple[str | None, int | None]:
        """(why the drain is ours, the hook failure behind it) or (None, None)."""
        if status.reason.startswith(self.prefix):
            return f"drain reason starts with {self.prefix!r}", None
        if status.reason not in HOOK_REASONS or status.reason_time_s is None:
            return None, None
        drained = status.reason_time_s
        with self._lock:
            failures = list(self._failures)
        for failed_ns in reversed(failures):
            failed = failed_ns / 1e9
            if failed - EVIDENCE_BEFORE_S <= drained <= failed + EVIDENCE_AFTER_S:
                return (f"{status.reason!r} follows a failure of spark-hook on this node "
                        "that sparkd recorded"), failed_ns
        return None, None
