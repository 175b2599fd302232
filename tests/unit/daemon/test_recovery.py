"""Which drains sparkd gives back: its own, the hook failures it can prove, nothing else."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from spark_slurm.daemon.recovery import NodeRecovery
from spark_slurm.slurm.runner import RunResult


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


class Slurm:
    """Answers `scontrol show node` with a given state/reason; records resumes."""

    def __init__(self, state: str, reason: str = "", when: float | None = None) -> None:
        self.line = f"NodeName=n1 Arch=x86_64 State={state} Weight=1"
        if reason:
            self.line += f" Reason={reason}" + (f" [root@{_stamp(when)}]" if when else "")
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], timeout_s: float | None = None) -> RunResult:
        self.calls.append(list(argv))
        if argv[1] == "update":
            self.line = "NodeName=n1 State=IDLE"
        return RunResult(tuple(argv), 0, self.line, "")

    @property
    def resumed(self) -> bool:
        return any(c[1] == "update" for c in self.calls)


def _recovery(slurm: Slurm, healthy: bool = True) -> tuple[NodeRecovery, list[Any]]:
    pers: list[Any] = []
    rec = NodeRecovery(node="n1", runner=slurm, commit=lambda kind, body: pers.append(
        (kind, body)), healthy=lambda: healthy)
    return rec, pers


def test_a_drain_with_the_project_prefix_is_resumed_and_recorded() -> None:
    now = time.time()
    slurm = Slurm("IDLE+DRAIN", "spark: sparkd not answering: socket gone", now)
    rec, pers = _recovery(slurm)
    assert rec.check() == "spark: sparkd not answering: socket gone"
    assert slurm.resumed
    [(kind, body)] = pers
    assert kind == "node" and body["event"] == "resume" and body["reason"].startswith("spark:")
    assert body["drained_ns"] == int(now) * 1_000_000_000


@pytest.mark.parametrize("reason", ["maintenance", "Prolog error", "Epilog error",
                                    "Not responding"])
def test_other_drains_are_left_alone(reason: str) -> None:
    slurm = Slurm("MIXED+DRAIN", reason, time.time())
    rec, pers = _recovery(slurm)
    assert rec.check() is None and not slurm.resumed and pers == []


def test_a_prolog_error_is_resumed_only_with_a_hook_failure_behind_it() -> None:
    now = time.time()
    slurm = Slurm("IDLE+DRAIN", "Prolog error", now)
    rec, pers = _recovery(slurm)
    rec.note_failure(int((now - 3600) * 1e9))   # an old failure explains nothing
    assert rec.check() is None and not slurm.resumed
    rec.note_failure(int((now - 1.5) * 1e9))    # the hook failed, then slurmctld drained
    assert rec.check() == "Prolog error" and slurm.resumed
    assert pers[0][1]["evidence_ns"] == int((now - 1.5) * 1e9)


def test_nothing_happens_while_unhealthy_or_when_not_drained() -> None:
    slurm = Slurm("IDLE+DRAIN", "spark: disk low", time.time())
    rec, _ = _recovery(slurm, healthy=False)
    assert rec.check() is None and slurm.calls == []
    idle = Slurm("IDLE")
    rec, pers = _recovery(idle)
    assert rec.check() is None and not idle.resumed and pers == []


def test_checks_are_scheduled_and_run_in_the_background() -> None:
    slurm = Slurm("IDLE+DRAIN", "spark: x", time.time())
    rec, pers = _recovery(slurm)
    rec.schedule((0.0,))
    rec.tick()
    deadline = time.monotonic() + 10
    while not pers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pers and rec.resumed == 1
