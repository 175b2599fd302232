"""Fixtures: two node ledgers (n1, n2) holding one shared job, built with the real Ledger."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from tests.unit.head.builders import build_node

# energy counters (mJ) the epilog recorded per GPU, per node, for job 100
ENERGY = {"n1": {0: 3_600_000_000, 1: 1_800_000_000}, "n2": {0: 900_000_000}}


@dataclass
class Cluster:
    root: Path
    trust: Path
    clock: ManualClock
    n1: Path
    n2: Path
    db: str
    """The cluster store these tests merge into (an SQLite path or a PostgreSQL URL)."""


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    clock = ManualClock()
    trust = tmp_path / "trust"
    n1 = build_node(tmp_path, "n1", trust, clock,
                    [("100", [0, 1], ENERGY["n1"]), ("200", [1], {1: 7_000_000})], throttle=True)
    n2 = build_node(tmp_path, "n2", trust, clock,
                    [("100", [0], ENERGY["n2"]), ("201", [1], {1: 5_000_000})])
    return Cluster(tmp_path, trust, clock, n1, n2, str(tmp_path / "cluster.db"))
