"""Merge's three ways of storing checked rows agree, and check and copy read one file.

Rows reach the cluster ledger by SQL from a private copy of the node ledger (in this
process or with worker processes doing the checks), or bound from memory (the path
`load_node_ledger` and lenient-read ledgers take). Whatever the damage, all three
must leave byte-identical cluster ledgers and the same findings.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from spark_slurm.head.headdb import HeadDb
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import (
    MergeSummary,
    Prepared,
    apply_prepared,
    merge_into,
    merge_ledgers,
    prepare,
)
from spark_slurm.head.scan import ref_seq_of
from spark_slurm.head.source import private_copy
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster
from tests.unit.head.test_merge_bulk import DAMAGE


def _dump(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    out = [ln for ln in conn.iterdump() if not ln.startswith('INSERT INTO "findings"')]
    findings = sorted(conn.execute("SELECT code, node, seq, detail, source FROM findings"))
    conn.close()
    return [*out, *map(repr, findings)]


def _bound(c: Cluster, into: Path, sources: list[str]) -> MergeSummary:
    with HeadDb.open(into, create=True) as db:
        return merge_into(db, sources, KeyRing.load(c.trust), clock=c.clock)


def _three_ways(c: Cluster, name: str, sources: list[str]) -> list[Path]:
    """Merge `sources` into three fresh cluster ledgers, one per way; returns them."""
    out = []
    for way in ("pool", "copy", "bound"):
        into = c.root / f"{name}-{way}.db"
        if way == "bound":
            _bound(c, into, sources)
        else:
            merge_ledgers(into, sources, keys_dir=c.trust, clock=c.clock,
                          workers=2 if way == "pool" else 1)
        out.append(into)
    return out


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_way_of_storing_gives_the_same_cluster_ledger(cluster: Cluster,
                                                            damage: str) -> None:
    if damage:
        tamper.sql(cluster.n1, damage)
    sources = [str(cluster.n1), str(cluster.n2), str(cluster.root / "missing.db")]
    pool, copy, bound = _three_ways(cluster, "c", sources)
    assert _dump(pool) == _dump(copy) == _dump(bound)
    assert any('INSERT INTO "records"' in ln for ln in _dump(pool))


def test_fork_evidence_is_the_same_every_way(cluster: Cluster, tmp_path: Path) -> None:
    sources = [str(cluster.n1), str(cluster.n2)]
    first = _three_ways(cluster, "f", sources)
    rows = tamper.rows(cluster.n1)
    del rows[4]  # a re-keyed history that parts from the merged one at seq 4
    tamper.rewrite(cluster.n1, rows, load_hmac_key(tmp_path / "keys-n1" / "hmac.key"))
    codes = []
    for way, into in zip(("pool", "copy", "bound"), first, strict=True):
        if way == "bound":
            summary = _bound(cluster, into, sources)
        else:
            summary = merge_ledgers(into, sources, keys_dir=cluster.trust, clock=cluster.clock,
                                    workers=2 if way == "pool" else 1)
        codes.append([f.code for f in summary.findings])
    assert codes[0] == codes[1] == codes[2] and "FORK" in codes[0]
    dumps = [_dump(p) for p in first]
    assert dumps[0] == dumps[1] == dumps[2]
    forks = sqlite3.connect(first[0]).execute("SELECT seq, typeof(body) FROM forks").fetchall()
    assert forks and {t for _, t in forks} == {"blob"}


def test_the_copy_is_what_gets_stored_not_the_source_file(cluster: Cluster) -> None:
    """Swap the source after it was checked: the checked bytes are stored, not the swap."""
    workdir = cluster.root / "work"
    workdir.mkdir(mode=0o700)
    item = prepare(str(cluster.n1), KeyRing.load(cluster.trust), workdir)
    assert isinstance(item, Prepared) and item.copy is not None
    assert stat.S_IMODE(item.copy.stat().st_mode) == 0o600
    original = tamper.rows(cluster.n1)
    tamper.sql(cluster.n1, "UPDATE per SET body = CAST('swapped' AS BLOB) WHERE seq = 3")
    into = cluster.root / "cluster.db"
    with HeadDb.open(into, create=True) as db:
        result = apply_prepared(db, item, cluster.clock)
        stored = db.conn.execute("SELECT seq, body FROM records ORDER BY seq").fetchall()
    assert result.ok and result.appended == len(original)
    assert stored == [(r[0], r[4]) for r in original]
    assert not item.copy.exists()  # removed once stored


def test_unmerged_wal_frames_are_copied(tmp_path: Path) -> None:
    """A ledger still open by its writer (frames only in its WAL) is copied whole."""
    files = keygen(tmp_path / "keys")
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(files.public_key, trust / "w1.pub")
    path = tmp_path / "w1.db"
    with Ledger.open(path, load_hmac_key(files.hmac_key), load_signing_key(files.signing_key),
                     node="w1") as led:
        led.append_many([("cap", {"v": 1, "node": "w1", "job_id": str(i)}) for i in range(50)])
        wal = Path(f"{path}-wal")
        assert wal.exists() and wal.stat().st_size > 0
        copy = private_copy(path, tmp_path)
        conn = sqlite3.connect(copy)
        assert conn.execute("SELECT count(*) FROM per").fetchone()[0] == led.size
        conn.close()
        summary = merge_ledgers(tmp_path / "cluster.db", [str(path)], keys_dir=trust)
        assert summary.ok and summary.appended == led.size


def test_the_working_directory_is_private_and_removed(cluster: Cluster) -> None:
    seen: list[tuple[str, int]] = []

    def look(_n: int) -> None:
        for entry in cluster.root.iterdir():
            if entry.name.startswith(".spark-merge-"):
                seen.append((entry.name, stat.S_IMODE(entry.stat().st_mode)))

    merge_ledgers(cluster.root / "cluster.db", [str(cluster.n1), str(cluster.n2)],
                  keys_dir=cluster.trust, progress=look, workers=2)
    assert seen and {mode for _, mode in seen} == {0o700}
    assert not [e for e in os.listdir(cluster.root) if e.startswith(".spark-merge-")]


@pytest.mark.parametrize(("body", "want"), [
    (b'{"body":{"ref":{"seq":7}}}', 7),
    (b'{"body":{"ref":{"seq":true}}}', True),
    (b'{"body":{"ref":{"seq":99999999999999999999}}}', None),  # does not fit SQLite
    (b'{"body":{"ref":{"seq":"7"}}}', None),
    (b'{"body":{"ref":7}}', None),
    (b'{"body":{"ref":', None),
    (b'{"body":{}}', None),
    (b'["ref":]', None),
])
def test_ref_seq_of(body: bytes, want: int | None) -> None:
    assert ref_seq_of(body) == want
