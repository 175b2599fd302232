"""Audit on a node ledger reads around the job, never the whole ledger.

The job's records come from the ledger's job index, its neighbours from the seq
range it spans, and each record is proven against a checkpoint the node's key
signed: on a schema-2 ledger by an RFC 6962 inclusion proof from the perfect
subtrees the ledger stores, on a schema-1 ledger (no stored subtrees) by its hash
chain to the next checkpoint. Either way damage elsewhere in a big ledger does not
touch this job's verdict, damage to the job's records does, and a gap in what was
read is named like merge names it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.head.audit import audit_job
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_signing_key
from tests.unit.head import tamper
from tests.unit.head.builders import POLICY, make_keys, write_job

JOBS = 80  # 5 records each: past the first 256-leaf block the ledger stores


@pytest.fixture(params=[2, 1], ids=["schema2", "schema1"])
def busy(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A node ledger with a checkpoint after each of jobs 1..JOBS; for schema 1, the
    stored subtrees are gone, as in a ledger written before them."""
    clock = ManualClock()
    keys = make_keys(tmp_path, "b1", tmp_path / "trust")
    path = tmp_path / "b1.db"
    with Ledger.open(path, None, keys.signing, node="b1", cluster="spark", clock=clock) as led:
        led.append("policy", dict(POLICY.snapshot_body(), node="b1"))
        for job in range(1, JOBS + 1):
            write_job(led, clock, "b1", str(job), [0], {0: 1000 * job})
            led.checkpoint()
    if request.param == 1:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("DROP TABLE IF EXISTS tree")
        conn.close()
    return path


def seqs(path: Path, job: str) -> list[int]:
    return [r[0] for r in tamper.rows(path) if r[3] == job]


def has_tree(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        (count,) = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tree'"
                                ).fetchone()
        return int(count) == 1
    finally:
        conn.close()


def test_each_record_is_proven_against_a_signed_checkpoint(busy: Path) -> None:
    report = audit_job(busy, "70")
    assert report.ok, report.problems
    assert {e.verification.proof for e in report.timeline} == {"ok"}
    sizes = {e.verification.checkpoint_size for e in report.timeline}
    size = len(tamper.rows(busy)) if has_tree(busy) else max(seqs(busy, "70")) + 1
    assert sizes == {size}  # the newest checkpoint, or the one right after the job


def test_damage_far_from_the_job_does_not_touch_its_verdict(busy: Path) -> None:
    """A record of job 2, inside the first stored block (or before job 70's chain walk)."""
    target = seqs(busy, "2")[1]
    tamper.sql(busy, "UPDATE per SET body = replace(body, 'alice', 'mallo') WHERE seq = ?",
               (target,))
    assert audit_job(busy, "70").ok
    damaged = audit_job(busy, "2")
    assert not damaged.ok
    assert target in {e.seq for e in damaged.timeline if not e.verification.ok}


def test_damage_to_a_job_record_fails_it(busy: Path) -> None:
    target = seqs(busy, "70")[-1]  # the job's last record, just before its checkpoint
    tamper.sql(busy, "UPDATE per SET body = replace(body, 'correlated', 'xorrelated')"
               " WHERE seq = ?", (target,))
    report = audit_job(busy, "70")
    assert not report.ok
    assert target in {e.seq for e in report.timeline if not e.verification.ok}


def test_a_record_newer_than_every_checkpoint_is_uncovered(busy: Path, tmp_path: Path) -> None:
    clock = ManualClock(2_000_000_000_000_000_000)
    with Ledger.open(busy, None, load_signing_key(tmp_path / "keys-b1" / "node.key"),
                     node="b1", cluster="spark", clock=clock) as led:
        write_job(led, clock, "b1", "77", [0], {0: 7})
    tamper.sql(busy, "DELETE FROM checkpoint WHERE size > ?", (min(seqs(busy, "77")),))
    report = audit_job(busy, "77")
    assert report.ok and {e.verification.proof for e in report.timeline} == {"uncovered"}
    assert any("newer than the latest checkpoint" in n for n in report.notes)
