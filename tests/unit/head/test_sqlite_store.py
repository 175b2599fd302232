"""What only the SQLite cluster store does: file checks, stored types, WAL settings, and
the upgrade of a schema-1 store made before incremental merge."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from spark_slurm.errors import HeadDbError
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.store import open_store, parse_url
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import query


def test_merge_refuses_to_write_into_a_node_ledger(cluster: Cluster) -> None:
    from spark_slurm.errors import HeadDbError  # noqa: PLC0415

    before = tamper.rows(cluster.n1)
    with pytest.raises(HeadDbError, match="node ledger"):
        merge_ledgers(cluster.n1, [str(cluster.n2)], keys_dir=cluster.trust)
    assert tamper.rows(cluster.n1) == before
    tables = {r[0] for r in sqlite3.connect(cluster.n1).execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert "records" not in tables



def test_merged_rows_are_stored_as_blobs_and_nulls(cluster: Cluster) -> None:
    into = cluster.db
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
    with closing(open_store(into)) as db:
        stored = query(db, "SELECT seq, body, hash, mac FROM records WHERE node_id = 1"
                       " ORDER BY seq")
    assert stored == [(r[0], r[4], r[6], r[7]) for r in tamper.rows(cluster.n1)]


def test_bulk_writes_restores_the_checkpoint_interval(cluster: Cluster) -> None:
    with closing(open_store(cluster.db, create=True)) as store:
        conn = store.conn  # type: ignore[attr-defined]
        conn.execute("PRAGMA wal_autocheckpoint=123")
        with store.bulk():
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 123
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 123


@pytest.mark.parametrize(("url", "want"), [
    ("/var/lib/spark/cluster.db", ("sqlite", "/var/lib/spark/cluster.db")),
    ("sqlite:///var/lib/spark/cluster.db", ("sqlite", "/var/lib/spark/cluster.db")),
    ("sqlite:cluster.db", ("sqlite", "cluster.db")),
    ("sqlite://localhost/tmp/x.db", ("sqlite", "/tmp/x.db")),
    ("postgresql://spark@db/head", ("postgresql", "postgresql://spark@db/head")),
    ("postgres://db/head", ("postgresql", "postgres://db/head")),
])
def test_db_urls(url: str, want: tuple[str, str]) -> None:
    assert parse_url(url) == want


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://otherhost/x.db", "sqlite:"])
def test_db_urls_that_are_refused(url: str) -> None:
    with pytest.raises(HeadDbError):
        parse_url(url)


@pytest.mark.parametrize("body", [
    b'{"body":{"ref":{"seq":7}}}', b'{"body":{"ref":{"seq":true}}}',
    b'{"body":{"ref":{"seq":false}}}', b'{"body":{"ref":{"seq":99999999999999999999}}}',
    b'{"body":{"ref":{"seq":"7"}}}', b'{"body":{"ref":{"seq":1.5}}}', b'{"body":{"ref":7}}',
    b'{"body":{"ref":', b'{"body":{}}', b'["ref":]', b'{"body":{"x":{"ref":{"seq":3}}}}',
    b'{"body":{"ref":{"hash":"ab","seq":12}},"job":null}',
])
def test_the_stored_ref_seq_is_the_one_audit_looks_up(body: bytes) -> None:
    """The store indexes body.ref.seq in SQL; it must be what scan.ref_seq_of reads."""
    from spark_slurm.head.scan import ref_seq_of  # noqa: PLC0415
    from spark_slurm.head.sqlite_store import _REF  # noqa: PLC0415

    conn = sqlite3.connect(":memory:")
    (got,) = conn.execute(f"SELECT {_REF} FROM (SELECT ? AS body)", (body,)).fetchone()
    want = ref_seq_of(body)
    assert got == (None if want is None else int(want))


def test_a_source_whose_per_is_a_view_is_refused(cluster: Cluster) -> None:
    """An attached file's schema must not run merge's functions (or anything else)."""
    tamper.sql(cluster.n1, "ALTER TABLE per RENAME TO per_rows")
    tamper.sql(cluster.n1, "CREATE VIEW per AS SELECT * FROM per_rows")
    summary = merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust)
    assert summary.results[0].error is not None
    assert "must be tables" in summary.results[0].error and summary.appended == 0
