"""Replay: state at an instant from the ledger alone; decisions re-evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import InputError
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.replay import parse_time, replay
from tests.unit.head.builders import build_node, decide
from tests.unit.head.conftest import Cluster

pytestmark = pytest.mark.both_stores


def merged(c: Cluster) -> str:
    merge_ledgers(c.db, [str(c.n1), str(c.n2)], keys_dir=c.trust, clock=c.clock)
    return c.db


def times(c: Cluster, node: str, kind: str, job: str | None = None) -> list[int]:
    from spark_slurm.head.store import open_store  # noqa: PLC0415

    db = open_store(c.db)
    try:
        return [r.time_ns for r in db.records_of_kind([kind], node)
                if job is None or r.job_id == job]
    finally:
        db.close()


def test_state_follows_cap_throttle_release_restore(cluster: Cluster) -> None:
    db = merged(cluster)
    cap_t = times(cluster, "n1", "cap", "100")[0]
    throttle_t = times(cluster, "n1", "throttle")[0]
    release_t = times(cluster, "n1", "release")[0]
    restore_t = times(cluster, "n1", "restore", "100")[0]
    granted = decide(2, 800000)["granted_mw"]

    def state(at: int) -> dict[int, tuple[int | None, str | None, str]]:
        return {g.gpu: (g.limit_mw, g.job_id, g.kind) for g in replay(db, at, "n1").gpus}

    assert state(cap_t - 1) == {}
    assert state(cap_t) == {0: (granted, "100", "cap"), 1: (granted, "100", "cap")}
    assert state(throttle_t)[0] == (250000, "100", "throttle")
    assert state(release_t)[0] == (granted, "100", "release")
    assert state(restore_t) == {0: (700000, None, "restore"), 1: (700000, None, "restore")}
    both = replay(db, 2**62)
    assert {g.node for g in both.gpus} == {"n1", "n2"}


def test_recheck_reproduces_every_recorded_decision(cluster: Cluster) -> None:
    report = replay(merged(cluster), 2**62, with_recheck=True)
    assert len(report.rechecks) == 4 and report.ok


def test_recheck_reports_a_decision_the_policy_does_not_give(tmp_path: Path) -> None:
    doctored = dict(decide(1, 400000), granted_mw=650000, action="allow")
    path = build_node(tmp_path, "n5", tmp_path / "trust", ManualClock(),
                      [("7", [0], {0: 1})])
    from spark_slurm.ledger import Ledger  # noqa: PLC0415
    from spark_slurm.ledger.keys import load_signing_key  # noqa: PLC0415
    from tests.unit.head.builders import write_job  # noqa: PLC0415

    clock = ManualClock(1_800_000_000_000_000_000)
    with Ledger.open(path, None, load_signing_key(tmp_path / "keys-n5" / "node.key"),
                     node="n5", clock=clock) as led:
        write_job(led, clock, "n5", "8", [0], {0: 1}, decision=doctored)
    report = replay(path, 2**62, with_recheck=True)
    bad = [r for r in report.rechecks if not r.ok]
    assert len(bad) == 1 and bad[0].recorded["granted_mw"] == 650000
    assert bad[0].replayed is not None and bad[0].replayed["granted_mw"] != 650000
    assert json.dumps(report.to_json())


@pytest.mark.parametrize(("text", "ns"), [
    ("1700000000", 1_700_000_000_000_000_000),
    ("1700000000.5", 1_700_000_000_500_000_000),
    ("1700000000123456789", 1_700_000_000_123_456_789),
    ("2023-11-14T22:13:20Z", 1_700_000_000_000_000_000),
    ("2023-11-14T22:13:20", 1_700_000_000_000_000_000),
    ("2023-11-14T23:13:20+01:00", 1_700_000_000_000_000_000),
])
def test_parse_time(text: str, ns: int) -> None:
    assert parse_time(text) == ns


def test_bad_time_and_unknown_node(cluster: Cluster) -> None:
    with pytest.raises(InputError, match="--at"):
        parse_time("yesterday-ish")
    with pytest.raises(InputError, match="node 'n7'"):
        replay(merged(cluster), 0, "n7")
