"""Merge resuming from what the head node holds: the other side of a fork kept as
evidence (exactly the records that chain on, no more), a duplicate of a held record
found from a segment alone, a new MAC epoch right after a held seal, and the
positions a collector asks for."""

from __future__ import annotations

import json
import shutil
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.head.merge import merge_ledgers, positions
from spark_slurm.head.store import display_url, open_store
from spark_slurm.head.witness import witness_file
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.checkpoint import origin_for
from spark_slurm.ledger.keys import load_signing_key
from spark_slurm.ledger.segment import export_segment
from tests.unit.head import tamper
from tests.unit.head.builders import found, k0, merge, more
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import query

pytestmark = pytest.mark.both_stores


def forks(c: Cluster) -> list[tuple[Any, ...]]:
    with closing(open_store(c.db)) as store:
        return query(store, "SELECT seq, time_ns, kind, body, prev_hash, hash, mac, key_id,"
                     " source FROM forks ORDER BY seq")


def duplicate_at(path: Path, seq: int) -> None:
    """Record `seq` replaced by a copy of record seq-1 (its envelope names seq-1)."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM per WHERE seq = ?", (seq,))
        conn.execute("INSERT INTO per SELECT seq + 1, time_ns, kind, job_id, body, prev_hash,"
                     " hash, mac, key_id FROM per WHERE seq = ?", (seq - 1,))


@pytest.mark.parametrize(("first", "bad"), [(5, None), (1, None), (5, 9)])
def test_a_fork_keeps_the_records_that_chain_on_up_to_the_held_head(
        cluster: Cluster, first: int, bad: int | None) -> None:
    """The node rewrote its history from `first` on (and, with `bad`, a duplicate sits
    at that seq of its new history) and wrote more past the head node's copy: the
    evidence is its records first..head that chain on from the held record first-1,
    up to the first that does not; nothing else moves."""
    assert merge(cluster, cluster.n1).ok
    head = len(tamper.rows(cluster.n1)) - 1
    other = cluster.root / "n1-other.db"
    shutil.copy(cluster.n1, other)
    rows = tamper.rows(other)
    rows[first][1] += 1  # another time: another record at that seq, re-chained
    tamper.rewrite(other, rows, k0(cluster))
    more(cluster, other, "300")
    if bad is not None:
        duplicate_at(other, bad)
    summary = merge(cluster, other)
    assert found(summary) == [("FORK", "n1", first)]
    assert summary.appended == 0 and summary.results[0].head_seq == head
    kept = [(*r[:2], r[2], r[4], r[5], r[6], r[7], r[8], str(other))
            for r in tamper.rows(other)[first:(head if bad is None else bad - 1) + 1]]
    assert forks(cluster) == kept
    assert (positions(cluster.db, ["n1"])[0].head_seq) == head


def test_a_segment_repeating_a_held_record_is_a_duplicate(cluster: Cluster) -> None:
    """The segment holds only the new rows: the earlier hash is the head node's."""
    assert merge(cluster, cluster.n1).ok
    head = len(tamper.rows(cluster.n1)) - 1
    more(cluster, cluster.n1, "300")
    for copied in (head, head - 3):
        seg = export_segment(cluster.n1, cluster.root / f"n1-{copied}.seg", head).path
        with closing(sqlite3.connect(seg)) as conn, conn:
            conn.execute("DELETE FROM per WHERE seq = ?", (head + 1,))
        with closing(sqlite3.connect(seg)) as conn, closing(sqlite3.connect(cluster.n1)) as led, \
                conn:
            row = led.execute("SELECT time_ns, kind, job_id, body, prev_hash, hash, mac, key_id"
                              " FROM per WHERE seq = ?", (copied,)).fetchone()
            conn.execute("INSERT INTO per VALUES (?,?,?,?,?,?,?,?,?)", (head + 1, *row))
        summary = merge(cluster, seg)
        assert [(f.code, f.seq, f.detail) for f in summary.findings] == [
            ("DUPLICATE", head + 1, f"repeats the record of seq {copied}")]
        assert summary.appended == 0


def test_a_new_epoch_right_after_a_held_seal_merges(cluster: Cluster) -> None:
    """The head node's last record is an epoch seal: the next record, MAC'd under the
    next epoch's key, is checked against the held seal."""
    keys = cluster.root / "keys-n1"
    with Ledger.open(cluster.n1, k0(cluster), load_signing_key(keys / "node.key"),
                     node="n1", clock=cluster.clock) as led:
        cluster.clock.advance(3600)
        (seal,) = led.maintain()
    assert json.loads(tamper.rows(cluster.n1)[-1][4])["body"]["event"] == "seal"
    assert merge(cluster, cluster.n1).ok
    assert positions(cluster.db, ["n1"])[0].head_seq == seal.seq
    more(cluster, cluster.n1, "300")
    summary = merge(cluster, cluster.n1)
    assert summary.ok and summary.appended == len(tamper.rows(cluster.n1)) - seal.seq - 1


def test_positions_name_every_node_asked_for(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    head = len(tamper.rows(cluster.n1)) - 1
    states = positions(cluster.db, ["n9", "n1"])
    assert [(s.name, s.head_seq, s.count) for s in states] == [("n9", None, 0),
                                                               ("n1", head, head + 1)]
    assert [s.name for s in positions(cluster.db)] == ["n1"]


def test_a_node_first_seen_by_the_witness_has_its_origin(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    state = tmp_path / "witness"
    (state / "keys").mkdir(parents=True)
    shutil.copy(cluster.trust / "n1.pub", state / "keys" / "n1.pub")
    with closing(sqlite3.connect(cluster.n1)) as conn:
        (text,) = conn.execute("SELECT text FROM checkpoint ORDER BY id DESC").fetchone()
    (tmp_path / "n1.cp").write_text(text)
    witnessed = witness_file(state, tmp_path / "n1.cp")
    summary = merge_ledgers(cluster.db, [], keys_dir=cluster.trust, witness_state=state)
    assert summary.ok and summary.results == []
    (n1,) = positions(cluster.db)
    assert n1.to_json() == {"node": "n1", "origin": origin_for("spark", "n1"), "head_seq": None,
                            "head_hash": None, "count": 0, "first_seq": 0}
    with closing(open_store(cluster.db)) as store:
        wit = store.largest_checkpoint(n1.node_id, "witness")
    assert wit is not None and (wit.size, wit.text) == (witnessed.size, witnessed.text)


def test_workers_report_progress_once_per_source(cluster: Cluster,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL, `--workers 2` runs two processes, whatever the CPU count, and
    never more processes than sources; SQLite (one writer) merges in this process."""
    from spark_slurm.head import merge as merge_mod  # noqa: PLC0415

    pools: list[int] = []

    def pool(count: int, **kw: Any) -> Any:
        pools.append(count)
        return ProcessPoolExecutor(count, **kw)

    monkeypatch.setattr(merge_mod, "ProcessPoolExecutor", pool)
    calls: list[int] = []
    summary = merge_ledgers(cluster.db, [str(cluster.n1), str(cluster.n2)],
                            keys_dir=cluster.trust, progress=calls.append, workers=2)
    assert summary.ok and calls == [1, 1]
    assert pools == ([2] if cluster.kind == "postgresql" else [])
    with closing(open_store(cluster.db)) as store:
        assert summary.into == display_url(store.url)
    one = merge_ledgers(cluster.another_store("one"), [str(cluster.n1)],
                        keys_dir=cluster.trust, progress=calls.append, workers=2)
    assert one.ok and calls == [1, 1, 1]
    assert pools == ([2] if cluster.kind == "postgresql" else [])  # one source: no pool
    asked = merge_ledgers(cluster.another_store("asked"), [str(cluster.n1), str(cluster.n2)],
                          keys_dir=cluster.trust, workers=1)
    assert asked.ok and pools == ([2] if cluster.kind == "postgresql" else [])  # as asked
    keyless = merge_ledgers(cluster.another_store("keyless"), [str(cluster.n1), str(cluster.n2)],
                            workers=2)  # no --keys: each genesis names its own key
    assert keyless.ok and keyless.appended == summary.appended
