"""Merge's bulk paths agree byte for byte with the ledger's own functions and the full checks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from spark_slurm.head.bulk import MerkleLevels, leaf_hashes
from spark_slurm.head.headdb import HeadDb
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.proofs import BLOCK, BLOCK_LEVEL
from spark_slurm.head.scan import NodeScan, scan_node
from spark_slurm.head.source import read_node_ledger
from spark_slurm.ledger import verify_ledger
from spark_slurm.ledger.keys import load_hmac_key
from spark_slurm.ledger.merkle import leaf_hash, root
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_prefix_roots_match_the_ledger_merkle_root() -> None:
    leaves = _leaves(1100)
    tree = MerkleLevels(leaves)
    for size in [*range(70), 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1099, 1100]:
        assert tree.root(size) == root(leaves[:size]), size
    with pytest.raises(ValueError, match="outside"):
        tree.root(1101)


def test_block_level_holds_every_complete_block_hash() -> None:
    leaves = _leaves(3 * BLOCK + 17)
    blocks = MerkleLevels(leaves).level(BLOCK_LEVEL)
    assert blocks == [root(leaves[b * BLOCK:(b + 1) * BLOCK]) for b in range(3)]
    assert MerkleLevels(leaves[:BLOCK - 1]).level(BLOCK_LEVEL) == []


def test_leaf_hashes_match_leaf_hash() -> None:
    bodies = [b"", b"x", bytes(range(256)) * 3]
    assert leaf_hashes(bodies) == [leaf_hash(b) for b in bodies]


def _scan(path: Path, trust: Path, *, fast: bool) -> NodeScan:
    records, cps = read_node_ledger(path)
    return scan_node(records, cps, KeyRing.load(trust), None, path.stem, fast=fast)


def _same(a: NodeScan, b: NodeScan) -> None:
    assert a.findings == b.findings
    assert a.good == b.good and a.leaves == b.leaves
    assert [c.text for c in a.valid_checkpoints] == [c.text for c in b.valid_checkpoints]
    assert (a.node, a.origin, a.mergeable) == (b.node, b.origin, b.mergeable)


DAMAGE = [
    "",
    "UPDATE per SET hash = randomblob(32) WHERE seq=4",
    "UPDATE per SET mac = randomblob(32) WHERE seq=5",
    "UPDATE per SET mac = NULL WHERE seq=5",
    "UPDATE per SET key_id = 'zz:0' WHERE seq=5",
    "UPDATE per SET time_ns = time_ns + 1 WHERE seq=6",
    "UPDATE per SET job_id = 'other' WHERE job_id IS NOT NULL AND seq > 2",
    "UPDATE per SET prev_hash = randomblob(32) WHERE seq=3",
    "DELETE FROM per WHERE seq=4",
    "UPDATE per SET kind = 'restore' WHERE seq=3",
    "UPDATE per SET body = CAST(body AS TEXT) WHERE seq=2",
    "UPDATE per SET kind = CAST(X'FF6361' AS TEXT) WHERE seq=3",
    "UPDATE per SET kind = CAST(kind AS BLOB) WHERE seq=3",
    "UPDATE per SET job_id = CAST(job_id AS BLOB) WHERE job_id IS NOT NULL",
    "UPDATE per SET key_id = CAST(key_id AS BLOB) WHERE seq=5",
    "UPDATE per SET time_ns = 'noon' WHERE seq=4",
    "UPDATE per SET seq = seq + 1000 WHERE seq >= 7",
    "INSERT INTO per SELECT (SELECT max(seq) + 1 FROM per), time_ns, kind, job_id, body,"
    " prev_hash, hash, mac, key_id FROM per WHERE seq = 3",
]


@pytest.mark.parametrize("damage", DAMAGE)
def test_fast_path_gives_the_verdicts_of_the_full_checks(cluster: Cluster, damage: str) -> None:
    if damage:
        tamper.sql(cluster.n1, damage)
    _same(_scan(cluster.n1, cluster.trust, fast=True), _scan(cluster.n1, cluster.trust,
                                                              fast=False))


@pytest.mark.parametrize(("damage", "finding"), [
    ("UPDATE per SET kind = CAST(kind AS BLOB) WHERE seq=3", ("TAMPERED", 3)),
    ("UPDATE per SET job_id = CAST(job_id AS BLOB) WHERE seq=3", ("TAMPERED", 3)),
    ("UPDATE per SET time_ns = 'noon' WHERE seq=4", ("TAMPERED", 4)),
    ("UPDATE per SET key_id = CAST(key_id AS BLOB) WHERE seq=5", ("UNKNOWN_KEY", 5)),
    # the bytes are what is hashed: a BLOB rewritten as TEXT of the same bytes is intact
    ("UPDATE per SET body = CAST(body AS TEXT) WHERE seq=2", None),
    ("UPDATE per SET hash = CAST(hash AS TEXT) WHERE seq=2", None),
])
def test_a_column_of_another_type_gets_the_verdict_of_verify(
        cluster: Cluster, damage: str, finding: tuple[str, int] | None) -> None:
    """Not a crash, and the seq `sparkctl verify` names."""
    tamper.sql(cluster.n1, damage)
    scan = _scan(cluster.n1, cluster.trust, fast=True)
    report = verify_ledger(cluster.n1, load_hmac_key(cluster.root / "keys-n1" / "hmac.key"))
    assert [(f.code, f.seq) for f in scan.findings] == ([finding] if finding else [])
    assert report.first_bad_seq == (finding[1] if finding else None)
    assert len(scan.good) == (finding[1] if finding else report.count)


def test_invalid_utf8_text_is_read_leniently(cluster: Cluster) -> None:
    tamper.sql(cluster.n1, "UPDATE per SET job_id = CAST(X'31FF' AS TEXT) WHERE seq=3")
    records, _ = read_node_ledger(cluster.n1)
    conn = sqlite3.connect(cluster.n1)
    count = conn.execute("SELECT count(*) FROM per").fetchone()[0]
    conn.close()
    assert records[3].job_id == "1\ufffd" and len(records) == count


def test_fast_path_agrees_after_a_keyed_rewrite(cluster: Cluster, tmp_path: Path) -> None:
    rows = tamper.rows(cluster.n1)
    del rows[4]
    tamper.rewrite(cluster.n1, rows, load_hmac_key(tmp_path / "keys-n1" / "hmac.key"))
    _same(_scan(cluster.n1, cluster.trust, fast=True), _scan(cluster.n1, cluster.trust,
                                                              fast=False))


def test_merged_rows_are_stored_as_blobs_and_nulls(cluster: Cluster) -> None:
    """Rows are bound as bytearray and '' for speed: stored types must not change."""
    into = cluster.root / "cluster.db"
    assert merge_ledgers(into, [str(cluster.n1), str(cluster.n2)], keys_dir=cluster.trust,
                         clock=cluster.clock).ok
    conn = sqlite3.connect(into)
    types = set(conn.execute(
        "SELECT typeof(body), typeof(prev_hash), typeof(hash), typeof(mac), typeof(leaf),"
        " typeof(ref_seq) FROM records"))
    refs = conn.execute("SELECT count(*) FROM records WHERE ref_seq IS NOT NULL").fetchone()[0]
    pages = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    conn.close()
    assert {t[:3] for t in types} == {("blob", "blob", "blob")}
    assert {t[3] for t in types} == {"blob"} and {t[4] for t in types} == {"blob"}
    assert {t[5] for t in types} == {"integer", "null"} and refs > 0
    assert pages == 1000  # the bulk setting is per connection, and restored
    with HeadDb.open(into) as db:
        n1 = db.node("n1")
        assert n1 is not None
        stored = db.conn.execute("SELECT seq, body, hash, mac FROM records WHERE node_id=?"
                                 " ORDER BY seq", (n1.node_id,)).fetchall()
        assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    source = [(r[0], r[4], r[6], r[7]) for r in tamper.rows(cluster.n1)]
    assert stored == source


def test_bulk_writes_restores_the_checkpoint_interval(tmp_path: Path) -> None:
    with HeadDb.open(tmp_path / "c.db", create=True) as db:
        db.conn.execute("PRAGMA wal_autocheckpoint=123")
        with db.bulk_writes():
            assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 123
        assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 123
