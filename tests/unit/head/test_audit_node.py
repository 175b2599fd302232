"""Audit on a node ledger reads around the job, never the whole ledger.

The job's records come from the ledger's job index, its neighbours from the seq
range it spans, and each record is proven by its hash chain to the next checkpoint
the node's key signed. So damage elsewhere in a big ledger does not touch this
job's verdict, damage between a job record and its checkpoint does, and a gap in
what was read is named like merge names it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.head.audit import audit_job
from spark_slurm.ledger import Ledger
from tests.unit.head import tamper
from tests.unit.head.builders import POLICY, make_keys, write_job


@pytest.fixture
def busy(tmp_path: Path) -> Path:
    """A node ledger with a checkpoint after each of jobs 1..6."""
    clock = ManualClock()
    keys = make_keys(tmp_path, "b1", tmp_path / "trust")
    path = tmp_path / "b1.db"
    with Ledger.open(path, keys.hmac, keys.signing, node="b1", cluster="spark",
                     clock=clock) as led:
        led.append("policy", dict(POLICY.snapshot_body(), node="b1"))
        for job in range(1, 7):
            write_job(led, clock, "b1", str(job), [0], {0: 1000 * job})
            led.checkpoint()
    return path


def seqs(path: Path, job: str) -> list[int]:
    return [r[0] for r in tamper.rows(path) if r[3] == job]


def test_each_record_is_proven_by_its_chain_to_the_next_checkpoint(busy: Path) -> None:
    report = audit_job(busy, "3")
    assert report.ok, report.problems
    sizes = {e.verification.checkpoint_size for e in report.timeline}
    assert len(sizes) == 1 and sizes.pop() == max(seqs(busy, "3")) + 1 + 0  # job 3's own
    assert all(e.verification.proof == "ok" for e in report.timeline)


def test_damage_far_from_the_job_does_not_touch_its_verdict(busy: Path) -> None:
    """A record of job 6, after job 3's checkpoint: not read for job 3."""
    tamper.sql(busy, "UPDATE per SET body = replace(body, 'alice', 'mallo') WHERE seq = ?",
               (seqs(busy, "6")[1],))
    assert audit_job(busy, "3").ok
    assert not audit_job(busy, "6").ok


def test_damage_between_a_record_and_its_checkpoint_fails_the_proof(busy: Path) -> None:
    target = seqs(busy, "3")[-1]  # job 3's last record, just before its checkpoint
    tamper.sql(busy, "UPDATE per SET body = replace(body, 'correlated', 'xorrelated')"
               " WHERE seq = ?", (target,))
    report = audit_job(busy, "3")
    assert not report.ok
    bad = {e.seq for e in report.timeline if not e.verification.ok}
    assert target in bad


def test_a_record_newer_than_every_checkpoint_is_uncovered(busy: Path, tmp_path: Path) -> None:
    clock = ManualClock()
    keys_dir = tmp_path / "keys-b1"
    from spark_slurm.ledger.keys import load_hmac_key, load_signing_key  # noqa: PLC0415

    with Ledger.open(busy, load_hmac_key(keys_dir / "hmac.key"),
                     load_signing_key(keys_dir / "node.key"), node="b1", cluster="spark",
                     clock=clock) as led:
        write_job(led, clock, "b1", "7", [0], {0: 7})
    tamper.sql(busy, "DELETE FROM checkpoint WHERE size > ?", (min(seqs(busy, "7")),))
    report = audit_job(busy, "7")
    assert report.ok and {e.verification.proof for e in report.timeline} == {"uncovered"}
    assert any("newer than the latest checkpoint" in n for n in report.notes)
