"""`witness --db`: the cosigned checkpoint also lands in the cluster store, where the next
merge holds the node to it (no --witness-state needed) and audits prove against it."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.store import open_store
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster

pytestmark = pytest.mark.both_stores


def newest(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT text FROM checkpoint ORDER BY id DESC").fetchone()[0])
    finally:
        conn.close()


def test_a_checkpoint_witnessed_with_db_binds_the_next_merge(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    cp = tmp_path / "n1.cp"
    cp.write_text(newest(cluster.n1))
    state = tmp_path / "witness"
    assert run(["witness", "--state", str(state), "--keys", str(cluster.trust), "--db",
                cluster.db, str(cp)]) == 0
    with closing(open_store(cluster.db)) as store:
        n1 = store.node("n1")
        assert n1 is not None
        wit = store.largest_checkpoint(n1.node_id, "witness")
    size = len(tamper.rows(cluster.n1))
    assert wit is not None and wit.size == size and "— witness/" in wit.text
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq >= ?", (size - 3,))
    tamper.sql(cluster.n1, "DELETE FROM checkpoint")  # the node's own copy is gone too
    summary = merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust)
    assert ("ROLLBACK", "n1", size - 3) in [(f.code, f.node, f.seq) for f in summary.findings]


def test_audits_prove_against_the_witnessed_checkpoint(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    assert merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust).ok
    cp = tmp_path / "n1.cp"
    cp.write_text(newest(cluster.n1))
    assert run(["witness", "--state", str(tmp_path / "w"), "--keys", str(cluster.trust),
                "--db", cluster.db, str(cp)]) == 0
    report = audit_job(cluster.db, "100")
    assert report.ok and {e.verification.proof for e in report.timeline} == {"ok"}
