"""A node's drain state and reason from `scontrol show node -o`, and resuming it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from spark_slurm.errors import SlurmCommandFailed, SlurmParseError
from spark_slurm.slurm.nodestate import node_status, parse_node, resume
from spark_slurm.slurm.runner import RunResult

DATA = Path(__file__).parents[2] / "data" / "slurm"


class Replay:
    def __init__(self, *results: RunResult) -> None:
        self.results = list(results)
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], timeout_s: float | None = None) -> RunResult:
        self.calls.append(list(argv))
        return self.results.pop(0)


def test_a_prolog_error_drain_recorded_from_slurm_22_05() -> None:
    status = parse_node((DATA / "node_prolog_error.oneline.txt").read_text(), "vm")
    assert status.drained and status.state == "IDLE+DRAIN"
    assert status.reason == "Prolog error" and status.reason_user == "root"
    assert status.reason_time_s == time.mktime((2026, 12, 2, 23, 27, 49, 0, 0, -1))


@pytest.mark.parametrize("line,drained,reason", [
    ("NodeName=n1 State=MIXED+DRAIN Reason=spark: sparkd unhealthy: disk low: x [root@"
     "2026-01-02T03:04:05]", True, "spark: sparkd unhealthy: disk low: x"),
    ("NodeName=n1 State=DOWN+DRAIN+NOT_RESPONDING Reason=maintenance", True, "maintenance"),
    ("NodeName=n1 State=IDLE", False, ""),
])
def test_states_and_reasons(line: str, drained: bool, reason: str) -> None:
    status = parse_node(line, "n1")
    assert (status.drained, status.reason) == (drained, reason)


def test_an_idle_node_and_the_commands_used() -> None:
    runner = Replay(RunResult(("scontrol",), 0, (DATA / "constructed_node_idle.oneline.txt")
                              .read_text(), ""), RunResult(("scontrol",), 0, "", ""))
    assert not node_status(runner, "vm").drained
    resume(runner, "vm")
    assert runner.calls == [["scontrol", "show", "node", "-o", "vm"],
                            ["scontrol", "update", "nodename=vm", "state=resume"]]


def test_unknown_node_and_failed_commands_are_typed_errors() -> None:
    with pytest.raises(SlurmParseError, match="no NodeName=n2 line"):
        parse_node("NodeName=n1 State=IDLE", "n2")
    runner = Replay(RunResult(("scontrol",), 1, "", "Node n9 not found"))
    with pytest.raises(SlurmCommandFailed, match="not found"):
        node_status(runner, "n9")
