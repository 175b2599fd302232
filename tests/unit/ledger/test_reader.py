"""Reads a node-ledger audit needs, each through an index, and the stored subtrees
that make inclusion proofs cost O(log n): checked against full-scan answers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.merkle import inclusion_proof, leaf_hash, verify_inclusion
from spark_slurm.ledger.reader import LedgerReader
from tests.unit.ledger.conftest import needs_shell_tools, shell_verify

JOBS = 90


def _write(path: Path) -> list[int]:
    """Jobs of cap → facility follow-up → restore (some ingested from the journal)
    → follow-up, thermal throttles without a job, checkpoints along the way."""
    clock = ManualClock()
    caps = []
    with Ledger.open(path, None, Ed25519PrivateKey.generate(), node="n1", cluster="c1",
                     clock=clock) as led:
        for j in range(JOBS):
            job = str(1000 + j)
            src = "journal" if j % 10 == 3 else "socket"
            cap = led.append("cap", {"v": 1, "node": "n1", "job_id": job, "source": src,
                                     "journal": {"inode": 5, "end": j}, "gpus": [j % 4]})
            caps.append(cap.seq)
            led.append("facility", {"v": 1, "node": "n1", "job_id": job,
                                    "ref": {"seq": cap.seq, "hash": cap.hash}})
            if j % 7 == 0:
                t = led.append("throttle", {"v": 1, "node": "n1", "gpu": j % 4})
                led.append("facility", {"v": 1, "node": "n1", "ref": {"seq": t.seq}})
            r = led.append("restore", {"v": 1, "node": "n1", "job_id": job, "gpus": [j % 4]})
            led.append("facility", {"v": 1, "node": "n1", "job_id": job,
                                    "ref": {"seq": r.seq, "hash": r.hash}})
            clock.advance(60)
            if j % 25 == 24:
                led.checkpoint()
    return caps


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[Path, list[int]]:
    path = tmp_path / "node.db"
    return path, _write(path)


def test_index_reads_equal_full_scans(ledger: tuple[Path, list[int]]) -> None:
    path, caps = ledger
    with LedgerReader(path) as reader:
        every = list(reader.records())
        assert reader.size == len(every) > 256 and reader.version == 2
        for job in ("1000", "1017", "1089", "nope"):
            assert reader.job_records(job) == [r for r in every if r.job_id == job]
        for kinds in (["cap"], ["throttle", "restore"], ["genesis", "key"], []):
            assert list(reader.records(kinds=kinds)) == [r for r in every if r.kind in kinds]
            assert list(reader.newest_first(kinds)) == [r for r in every[::-1]
                                                         if r.kind in kinds]
        assert list(reader.records(since=10, until=20)) == every[10:20]
        assert list(reader.newest_first(before=30)) == every[:31][::-1]
        assert reader.record(caps[5]) == every[caps[5]]
        assert reader.record(10**6) is None
        assert reader.latest("cap", before=caps[3]) == every[caps[2]]
        for seq in range(len(every)):
            expected = [r for r in every if r.kind == "facility" and r.body["ref"]["seq"] == seq]
            assert reader.followups(seq) == expected


def test_the_newest_ingested_record_is_kept_in_state(ledger: tuple[Path, list[int]]) -> None:
    path, _ = ledger
    with LedgerReader(path) as reader:
        every = list(reader.records())
        journal = [r for r in every if r.body.get("source") == "journal"]
        assert len(journal) == JOBS // 10
        assert reader.latest_ingested("journal") == journal[-1]
        assert reader.latest_ingested("spool") is None
    clock = ManualClock(every[-1].time_ns)
    with Ledger.open(path, None, node="n1", cluster="c1", clock=clock) as led:
        assert led.latest_ingested("journal") == journal[-1]
        spool = led.append("admission", {"v": 1, "node": "n1", "source": "spool"})
        led.append("cap", {"v": 1, "node": "n1", "source": "socket", "text": '"source":"spool"'})
        assert led.latest_ingested("spool") == next(led.records(since=spool.seq))
    assert verify_ledger(path).ok


def test_inclusion_proofs_from_stored_subtrees(ledger: tuple[Path, list[int]]) -> None:
    path, _ = ledger
    with LedgerReader(path) as reader:
        leaves = [leaf_hash(r.body_bytes) for r in reader.records()]
        cps = reader.checkpoints()
        assert reader.latest_checkpoint() == cps[-1]
        assert reader.latest_checkpoint(cps[0].size) == cps[0]
        for cp in cps:
            tree = reader.tree(cp.size)
            assert tree.root() == cp.root
            for seq in {s for s in (0, 1, 255, 256, cp.size // 2, cp.size - 1) if s < cp.size}:
                proof = reader.inclusion_proof(seq, cp.size)
                assert proof == inclusion_proof(leaves[:cp.size], seq)
                assert verify_inclusion(leaves[seq], seq, cp.size, proof, cp.root)


def _sql(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("sql", "reason"), [
    ("UPDATE tree SET hash = zeroblob(32)", "stored Merkle subtrees do not match"),
    ("DELETE FROM tree", "stored Merkle subtrees do not match"),
    ("INSERT INTO tree VALUES (9, 0, zeroblob(32))", "stored Merkle subtrees do not match"),
    ("UPDATE state SET value = CAST(CAST(value AS TEXT) - 4 AS BLOB) WHERE key = "
     "'latest.journal'", "saved newest journal record does not match"),
    ("DELETE FROM state WHERE key = 'latest.journal'", "saved newest journal record"),
    ("INSERT INTO state VALUES ('latest.spool', CAST('3' AS BLOB))", "saved newest spool"),
    ("INSERT INTO state VALUES ('latest.x', CAST('3' AS BLOB))", "unknown saved state"),
    ("UPDATE checkpoint SET size = size - 1 WHERE id = 2", "columns do not match"),
    ("UPDATE checkpoint SET key_id = 'x' WHERE id = 2", "columns do not match"),
    ("UPDATE checkpoint SET time_ns = 'soon' WHERE id = 3", "columns do not match"),
])
def test_derived_tables_are_verified(ledger: tuple[Path, list[int]], sql: str,
                                     reason: str) -> None:
    path, _ = ledger
    assert verify_ledger(path).ok
    _sql(path, sql)
    report = verify_ledger(path)
    assert not report.ok and reason in report.reason and report.first_bad_seq is None


@needs_shell_tools
@pytest.mark.parametrize("sql", [
    "UPDATE tree SET hash = zeroblob(32)",
    "DELETE FROM state WHERE key = 'latest.journal'",
    "UPDATE checkpoint SET key_id = 'x' WHERE id = 2",
])
def test_the_shell_verifier_checks_them_too(ledger: tuple[Path, list[int]], sql: str) -> None:
    path, _ = ledger
    _sql(path, sql)
    code, text = shell_verify(path)
    report = verify_ledger(path)
    assert code == 1 and text.strip().endswith(report.reason), (text, report.reason)


def test_a_proof_reads_at_most_two_blocks_of_leaves(tmp_path: Path) -> None:
    from spark_slurm.ledger.chain import SUBTREE_LEVEL, Chain  # noqa: PLC0415
    from spark_slurm.ledger.tree import StoredTree  # noqa: PLC0415

    leaves = [leaf_hash(b"%d" % i) for i in range(2100)]
    chain = Chain()
    chain.subtrees = []
    chain.add_leaves(leaves)
    stored = {(lvl, idx): h for lvl, idx, h in chain.subtrees}
    read: list[int] = []

    def leaf_range(lo: int, hi: int) -> list[bytes]:
        read.append(hi - lo)
        return leaves[lo:hi]

    for size in (300, 1025, 2100):
        for seq in (0, 299, size // 3, size - 1):
            read.clear()
            tree = StoredTree(size, leaf_range, lambda lvl, idx: stored.get((lvl, idx)))
            proof = tree.inclusion_proof(seq)
            assert proof == inclusion_proof(leaves[:size], seq)
            assert sum(read) <= 2 << SUBTREE_LEVEL, (size, seq, read)
