"""Facility follow-up verdicts from in-test rack and GPU windows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.daemon.facility import FacilityFollower
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.ledger import Ledger, Receipt
from spark_slurm.policy.model import FacilitySettings


@dataclass
class Window:
    mean_mw: int
    min_mw: int = 0
    max_mw: int = 0
    samples: int = 60
    gaps: int = 0


@dataclass
class Rack:
    """Rack power `before_mw` until the change, `after_mw` from then on."""

    change_ns: int
    before_mw: int
    after_mw: int

    def window(self, t0: int, t1: int) -> Window:
        return Window(self.before_mw if t1 <= self.change_ns else self.after_mw)

    def stats(self) -> dict[str, int]:
        return {"frames": 1}


@dataclass
class Gpu:
    """GPUs 0 and 1 move from before_mw to after_mw at the change; others as told."""

    change_ns: int
    before_mw: int
    after_mw: int
    others: dict[int, tuple[int, int] | None] = field(default_factory=dict)

    @property
    def indices(self) -> tuple[int, ...]:
        return (0, 1, *self.others)

    def window(self, index: int, t0: int, t1: int) -> list[Any]:
        before, after = (self.before_mw, self.after_mw) if index < 2 else (
            self.others[index] or (0, 0))
        if index >= 2 and self.others[index] is None:
            return []  # this GPU's telemetry is failing
        mw = before if t1 <= self.change_ns else after
        return [type("S", (), {"power_mw": mw})()]


@dataclass
class Settings:
    facility: FacilitySettings = field(default_factory=lambda: FacilitySettings(
        before_s=0.05, after_s=0.05, tolerance_w=100, tolerance_pct=10))


@dataclass
class Pol:
    settings: Settings = field(default_factory=Settings)
    sha256: str = "x"
    text: str = ""

    def evaluate(self, request: Any) -> Any:
        raise AssertionError("not used")


def _run(tmp_path: Path, rack_delta_mw: int | None, enabled: bool = True,
         others: dict[int, tuple[int, int] | None] | None = None) -> dict[str, Any]:
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = LedgerWriter(ledger)
    writer.start()
    now = time.time_ns()
    policy = Pol()
    if not enabled:
        policy.settings.facility = FacilitySettings(enabled=False, before_s=0.05, after_s=0.05)
    stream = None if rack_delta_mw is None else Rack(now, 5_000_000, 5_000_000 + rack_delta_mw)
    follower = FacilityFollower(node="n1", writer=writer, policy=lambda: policy, stream=stream,
                                telemetry=Gpu(now, 1_000_000, 400_000, others or {}),
                                index_of=lambda m: m)
    follower.start()
    follower.schedule("cap", Receipt(7, "ab" * 32), [0, 1], now, "42")
    deadline = time.monotonic() + 10
    while follower.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    follower.stop()
    writer.stop()
    (record,) = list(ledger.records(kinds=["facility"]))
    ledger.close()
    return record.body


def test_rack_matching_the_gpus_is_correlated(tmp_path: Path) -> None:
    body = _run(tmp_path, -1_250_000)  # the GPUs imply -1.2 kW
    assert body["verdict"] == "correlated"
    assert body["expected_delta_mw"] == -1_200_000 and body["delta_mw"] == -1_250_000
    assert body["tolerance_mw"] == 120_000
    assert body["ref"] == {"seq": 7, "hash": "ab" * 32} and body["job_id"] == "42"


def test_another_jobs_change_in_the_same_window_is_expected_not_flagged(
        tmp_path: Path) -> None:
    # GPU 2 (another job) is raised by 500 W in the same window: the rack sees
    # -1.2 kW + 0.5 kW, and so must the expectation.
    body = _run(tmp_path, -700_000, others={2: (400_000, 900_000)})
    assert body["expected_delta_mw"] == -700_000
    assert body["verdict"] == "correlated"


def test_a_gpu_outside_the_job_without_telemetry_is_named(tmp_path: Path) -> None:
    body = _run(tmp_path, -1_200_000, others={3: None})
    assert body["verdict"] == "correlated"
    assert body["gpus_unsampled"] == [3]


def test_rack_not_following_is_flagged(tmp_path: Path) -> None:
    assert _run(tmp_path, -100_000)["verdict"] == "flagged"


def test_no_stream_or_disabled_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    body = _run(tmp_path, None)
    assert body["verdict"] == "unavailable" and "Karman" in body["reason"]
    (tmp_path / "d").mkdir()
    body = _run(tmp_path / "d", -1_200_000, enabled=False)
    assert body["verdict"] == "unavailable" and "disabled" in body["reason"]


@pytest.mark.parametrize(("rack_delta_mw", "verdict"), [
    (-1_200_000 + 120_000, "correlated"),  # exactly the tolerance away: still correlated
    (-1_200_000 - 120_000, "correlated"),
    (-1_200_000 + 120_001, "flagged"),  # one milliwatt further: flagged
    (-1_200_000 - 120_001, "flagged"),
])
def test_the_tolerance_is_inclusive_on_both_sides(tmp_path: Path, rack_delta_mw: int,
                                                  verdict: str) -> None:
    body = _run(tmp_path, rack_delta_mw)
    assert (body["verdict"], body["tolerance_mw"]) == (verdict, 120_000)
    assert abs(body["delta_mw"] - body["expected_delta_mw"]) == abs(rack_delta_mw + 1_200_000)
