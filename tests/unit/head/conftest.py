"""Fixtures: two node ledgers (n1, n2) holding one shared job, built with the real Ledger,
and the cluster store they merge into.

A module marked `both_stores` runs each of its tests against SQLite and against a
fresh database on a real PostgreSQL 15 server (`pg_server`, tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.clock import ManualClock
from tests.unit.head.builders import build_node

# energy counters (mJ) the epilog recorded per GPU, per node, for job 100
ENERGY = {"n1": {0: 3_600_000_000, 1: 1_800_000_000}, "n2": {0: 900_000_000}}
STORES = ("sqlite", "postgresql")


@dataclass
class Cluster:
    root: Path
    trust: Path
    clock: ManualClock
    n1: Path
    n2: Path
    db: str
    """The cluster store these tests merge into (an SQLite path or a PostgreSQL URL)."""
    kind: str = "sqlite"
    new_store: Callable[[str], str] | None = None

    def another_store(self, name: str) -> str:
        """A second, empty store of the same kind (to compare two merges)."""
        assert self.new_store is not None
        return self.new_store(name)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        kinds = STORES if metafunc.definition.get_closest_marker("both_stores") else STORES[:1]
        metafunc.parametrize("store_kind", kinds, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def cluster(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Cluster:
    clock = ManualClock()
    trust = tmp_path / "trust"
    n1 = build_node(tmp_path, "n1", trust, clock,
                    [("100", [0, 1], ENERGY["n1"]), ("200", [1], {1: 7_000_000})], throttle=True)
    n2 = build_node(tmp_path, "n2", trust, clock,
                    [("100", [0], ENERGY["n2"]), ("201", [1], {1: 5_000_000})])
    new_store: Callable[[str], str]
    if store_kind == "postgresql":
        server: Any = request.getfixturevalue("pg_server")
        new_store = lambda _name: str(server.database())  # noqa: E731
    else:
        new_store = lambda name: str(tmp_path / f"{name}.db")  # noqa: E731
    return Cluster(tmp_path, trust, clock, n1, n2, new_store("cluster"), store_kind,
                   new_store)
