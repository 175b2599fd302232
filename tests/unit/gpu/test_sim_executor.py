"""The simulated external executor: what it asks, what it sets, and when it refuses to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from spark_slurm.cli import cli
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.gpu.sim_executor import Plan, run_executor


class Daemon:
    """Answers intents like sparkd would: approve up to 500 W, deny above."""

    def __init__(self) -> None:
        self.asked: list[tuple[list[int], float, str, dict[str, Any]]] = []

    def __call__(self, gpus: list[int], watts: float, name: str, **kw: Any) -> dict[str, Any]:
        self.asked.append((gpus, watts, name, kw))
        if watts <= 500:
            return {"ok": True, "verdict": "approve", "intent": {"id": "i1"}}
        return {"ok": False, "verdict": "deny", "error": {"code": "denied", "message": "no"}}


@pytest.fixture
def fleet(tmp_path: Path) -> SimFleet:
    return SimFleet.init(tmp_path / "sim", 4, "b200", minors=[3, 2, 1, 0])


def _limit(fleet: SimFleet, minor: int) -> int:
    index = next(d.index for d in fleet.devices if d.minor == minor)
    return fleet.limits(index).enforced_mw


def test_announces_then_sets_by_minor_number(fleet: SimFleet, tmp_path: Path) -> None:
    daemon = Daemon()
    out = run_executor(Plan(gpus=(0, 1), watts=450, name="dcgm", job_id="7", deadline_s=3),
                       fleet, tmp_path / "s.sock", announce=daemon)
    assert out.approved is True and [c.new_mw for c in out.applied] == [450_000, 450_000]
    assert _limit(fleet, 0) == _limit(fleet, 1) == 450_000 and _limit(fleet, 3) == 1_000_000
    assert daemon.asked == [([0, 1], 450, "dcgm", {"job_id": "7", "deadline_s": 3,
                                                   "socket_path": tmp_path / "s.sock"})]


def test_obeys_a_denial_unless_told_to_ignore_it(fleet: SimFleet, tmp_path: Path) -> None:
    daemon = Daemon()
    obeyed = run_executor(Plan(gpus=(2,), watts=800), fleet, tmp_path, announce=daemon)
    assert obeyed.approved is False and obeyed.applied == () and "denied" in str(obeyed.skipped)
    assert _limit(fleet, 2) == 1_000_000
    rogue = run_executor(Plan(gpus=(2,), watts=800, obey=False), fleet, tmp_path,
                         announce=daemon)
    assert rogue.approved is False and _limit(fleet, 2) == 800_000


def test_blind_mismatched_and_idle_plans(fleet: SimFleet, tmp_path: Path) -> None:
    daemon = Daemon()
    blind = run_executor(Plan(gpus=(3,), watts=300, announce=False), fleet, tmp_path,
                         announce=daemon)
    assert blind.reply is None and daemon.asked == [] and _limit(fleet, 3) == 300_000
    other = run_executor(Plan(gpus=(3,), watts=400, apply_watts=420), fleet, tmp_path,
                         announce=daemon)
    assert other.approved and _limit(fleet, 3) == 420_000
    idle = run_executor(Plan(gpus=(3,), watts=400, apply=False), fleet, tmp_path,
                        announce=daemon)
    assert idle.applied == () and _limit(fleet, 3) == 420_000


def test_cli_refuses_bad_numbers_and_reports_an_unreachable_daemon(fleet: SimFleet) -> None:
    runner = CliRunner()
    bad = runner.invoke(cli, ["sim", "executor", str(fleet.root), "--gpu", "0", "--watts",
                              "nan"])
    assert bad.exit_code != 0 and "--watts must be a positive number" in str(bad.exception)
    down = runner.invoke(cli, ["sim", "executor", str(fleet.root), "--gpu", "0", "--watts",
                               "300", "--socket", str(fleet.root / "none.sock")])
    assert down.exit_code != 0 and "cannot reach sparkd" in str(down.exception)
    assert _limit(fleet, 0) == 1_000_000  # nothing set without an answer
