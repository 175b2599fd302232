"""A schema-1 cluster store (before incremental merge) is upgraded in place when opened.

The store is made with schema 1's exact DDL (as released) and filled as that
version's merge filled it; opening it must add each node's compact range, signing
keys and stored subtrees, so audits still prove every record and the next merge
reads only what is new.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.retention import BLOCK
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from spark_slurm.ledger.merkle import root
from tests.unit.head import tamper
from tests.unit.head.builders import write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import dump

V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS head_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    origin TEXT,
    head_seq INTEGER,
    head_hash TEXT,
    count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    node_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB,
    key_id TEXT,
    ref_seq INTEGER,
    leaf BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_node_seq ON records(node_id, seq);
CREATE INDEX IF NOT EXISTS records_job ON records(job_id) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_ref ON records(node_id, ref_seq) WHERE ref_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS merkle_blocks (
    node_id INTEGER NOT NULL,
    block INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (node_id, block)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    node_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    root TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    UNIQUE (node_id, size, root, source)
);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY,
    code TEXT NOT NULL,
    node TEXT NOT NULL,
    seq INTEGER,
    detail TEXT NOT NULL,
    source TEXT NOT NULL,
    first_seen_ns INTEGER NOT NULL,
    UNIQUE (code, node, seq, detail)
);
CREATE TABLE IF NOT EXISTS forks (
    node_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB,
    key_id TEXT,
    source TEXT NOT NULL,
    UNIQUE (node_id, seq, hash)
);
"""


def _as_schema_1(v2: Path, v1: Path) -> None:
    """What schema 1's merge would have stored for the same ledgers: the same rows,
    and the block cache it kept instead of subtrees."""
    conn = sqlite3.connect(v1)
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT INTO head_meta VALUES ('magic', 'spark-head'), ('schema', '1')")
    conn.execute("ATTACH ? AS new", (str(v2),))
    conn.execute("INSERT INTO nodes SELECT node_id, name, origin, head_seq, head_hash, count"
                 " FROM new.nodes")
    conn.execute("INSERT INTO records SELECT * FROM new.records")
    conn.execute("INSERT INTO checkpoints SELECT * FROM new.checkpoints")
    conn.execute("INSERT INTO findings SELECT * FROM new.findings")
    for node_id, count in conn.execute("SELECT node_id, count FROM nodes").fetchall():
        leaves = [bytes(r[0]) for r in conn.execute(
            "SELECT leaf FROM records WHERE node_id=? ORDER BY seq", (node_id,))]
        conn.executemany("INSERT INTO merkle_blocks VALUES (?,?,?)",
                         [(node_id, b, root(leaves[b * BLOCK:(b + 1) * BLOCK]))
                          for b in range(count // BLOCK)])
    conn.commit()
    conn.execute("DETACH new")
    conn.close()


def test_a_schema_1_store_is_upgraded_and_merges_on(cluster: Cluster, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    with Ledger.open(cluster.n1, load_hmac_key(tmp_path / "keys-n1" / "hmac.key"),
                     load_signing_key(tmp_path / "keys-n1" / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        for job in range(300, 340):  # past one 256-leaf block
            write_job(led, cluster.clock, "n1", str(job), [0], {0: 1})
        led.checkpoint()
    assert merge_ledgers(fresh, [str(cluster.n1), str(cluster.n2)], keys_dir=cluster.trust,
                         clock=cluster.clock).ok
    old = tmp_path / "old.db"
    _as_schema_1(fresh, old)
    with closing(open_store(old)) as store:  # upgrades
        meta = store.conn.execute("SELECT value FROM head_meta WHERE key='schema'"  # type: ignore[attr-defined]
                                  ).fetchone()
        states = {n.name: n for n in store.nodes()}
    assert meta == ("2",)
    assert dump(old) == dump(fresh)  # ranges, keys and subtrees as merge would keep them
    assert audit_job(old, "100", keys_dir=cluster.trust).ok
    assert len(tamper.rows(cluster.n1)) == states["n1"].next_seq
    with Ledger.open(cluster.n1, load_hmac_key(tmp_path / "keys-n1" / "hmac.key"),
                     load_signing_key(tmp_path / "keys-n1" / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        write_job(led, cluster.clock, "n1", "400", [0], {0: 1})
    summary = merge_ledgers(old, [str(cluster.n1), str(cluster.n2)], keys_dir=cluster.trust)
    assert summary.ok and summary.results[0].read == summary.appended > 0
    assert audit_job(old, "400", keys_dir=cluster.trust).ok
