"""A source that overlaps what the head node holds: where its history parts from the
held one (FORK at the first differing seq, the other side kept as evidence, nothing
merged past it), an older copy that also differs (ROLLBACK and FORK), a held record
the node lost since (not read again), and a fork past the first page of hashes."""

from __future__ import annotations

import shutil
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.head.merge import positions
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_signing_key
from spark_slurm.ledger.segment import export_segment
from tests.unit.head import tamper
from tests.unit.head.builders import found, hold_genesis_only, k0, merge, more, write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import query

pytestmark = pytest.mark.both_stores


def head(c: Cluster) -> int:
    state = positions(c.db, ["n1"])[0]
    assert state.head_seq is not None
    return state.head_seq


def fork_seqs(c: Cluster) -> list[Any]:
    with closing(open_store(c.db)) as store:
        return [r[0] for r in query(store, "SELECT seq FROM forks ORDER BY seq")]


def rewritten_from(c: Cluster, seq: int, name: str) -> Path:
    """A copy of n1 whose history differs from `seq` on (re-chained and re-MACed)."""
    other = c.root / name
    shutil.copy(c.n1, other)
    rows = tamper.rows(other)
    rows[seq][1] += 1
    tamper.rewrite(other, rows, k0(c))
    return other


def test_an_overlapping_segment_of_another_history_is_a_fork_at_its_first_row(
        cluster: Cluster) -> None:
    """Every overlapping row is compared (a segment's rows are not yet proven to link),
    the first one included; the node's new rows past the head are not merged."""
    assert merge(cluster, cluster.n1).ok
    held = head(cluster)
    after = held - 5
    other = rewritten_from(cluster, after + 1, "other.db")
    more(cluster, other, "300")
    seg = export_segment(other, cluster.root / "other.seg", after).path
    summary = merge(cluster, seg)
    assert found(summary) == [("FORK", "n1", after + 1)]
    assert summary.appended == 0 and head(cluster) == held
    assert fork_seqs(cluster) == list(range(after + 1, held + 1))


def test_an_overlapping_segment_with_one_row_changed_is_a_fork_there(cluster: Cluster) -> None:
    """The head row agrees; an earlier overlapping one does not (not re-chained)."""
    assert merge(cluster, cluster.n1).ok
    held = head(cluster)
    more(cluster, cluster.n1, "300")
    seg = Path(export_segment(cluster.n1, cluster.root / "n1.seg", held - 5).path)
    tamper.sql(seg, "UPDATE per SET hash = randomblob(32) WHERE seq = ?", (held - 4,))
    summary = merge(cluster, seg)
    assert found(summary) == [("FORK", "n1", held - 4)] and summary.appended == 0


def test_an_older_copy_that_differs_at_its_end_is_a_rollback_and_a_fork(
        cluster: Cluster) -> None:
    more(cluster, cluster.n1, "300")
    assert merge(cluster, cluster.n1).ok
    held = head(cluster)
    size = held - 3
    old = rewritten_from(cluster, size - 1, "old.db")
    tamper.sql(old, "DELETE FROM per WHERE seq >= ?", (size,))
    summary = merge(cluster, old)
    assert found(summary) == [("ROLLBACK", "n1", size), ("FORK", "n1", size - 1)]
    assert summary.appended == 0 and head(cluster) == held
    assert fork_seqs(cluster) == [size - 1]


def test_a_held_record_the_node_since_lost_is_not_read_again(cluster: Cluster) -> None:
    """The head node's copy is the verified one; the new rows link to it."""
    assert merge(cluster, cluster.n1).ok
    held = head(cluster)
    more(cluster, cluster.n1, "300")
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq = ?", (held,))
    summary = merge(cluster, cluster.n1)
    assert summary.ok and head(cluster) == len(tamper.rows(cluster.n1))


def test_a_fork_past_the_first_page_of_hashes_is_named_at_its_seq(cluster: Cluster) -> None:
    """More than one page (4096) of held hashes is searched for where they part."""
    keys = cluster.root / "keys-n1"
    with Ledger.open(cluster.n1, k0(cluster), load_signing_key(keys / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        led.append_many([("cap", {"v": 1, "node": "n1", "job_id": str(i)})
                         for i in range(led.size, 4200)])
    assert merge(cluster, cluster.n1).ok
    other = rewritten_from(cluster, 4150, "other.db")
    summary = merge(cluster, other)
    assert found(summary) == [("FORK", "n1", 4150)]
    assert fork_seqs(cluster) == list(range(4150, 4200))


def test_a_ledger_recreated_with_the_same_keys_is_a_fork_at_genesis(cluster: Cluster) -> None:
    """The head node holds only n1's genesis; the node's file was wiped and begun again."""
    hold_genesis_only(cluster)
    again = cluster.root / "again" / "n1.db"
    again.parent.mkdir()
    cluster.clock.advance(10)
    keys = cluster.root / "keys-n1"
    with Ledger.open(again, k0(cluster), load_signing_key(keys / "node.key"), node="n1",
                     cluster="spark", clock=cluster.clock) as led:
        write_job(led, cluster.clock, "n1", "300", [0], {0: 42})
    summary = merge(cluster, again)
    assert found(summary) == [("FORK", "n1", 0)]
    assert summary.appended == 0 and head(cluster) == 0
