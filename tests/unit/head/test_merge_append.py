"""Appending past the held head at its edges: a head node that holds only a node's
genesis (head seq 0, which is not "nothing held"), a held head record lost from the
store, and a ledger with a row before its genesis record."""

from __future__ import annotations

import shutil
from contextlib import closing
from pathlib import Path

import pytest

from spark_slurm.head.merge import positions
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_signing_key
from spark_slurm.ledger.prune import prune_ledger
from spark_slurm.ledger.segment import export_segment
from tests.unit.head import tamper
from tests.unit.head.builders import build_node, hold_genesis_only, k0, merge, more
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import execute, query

pytestmark = pytest.mark.both_stores


def head(c: Cluster) -> int | None:
    return positions(c.db, ["n1"])[0].head_seq


@pytest.mark.parametrize("kind", ["ledger", "segment"])
def test_a_node_held_up_to_its_genesis_merges_the_rest(cluster: Cluster, kind: str) -> None:
    """The rest of the ledger, or a segment exported after seq 0, links to the held
    genesis; its signed checkpoint is checked against the held genesis and the new rows."""
    hold_genesis_only(cluster)
    size = len(tamper.rows(cluster.n1))
    source: Path = cluster.n1 if kind == "ledger" else Path(
        export_segment(cluster.n1, cluster.root / "n1.seg", 0).path)
    summary = merge(cluster, source)
    assert summary.ok, summary.findings
    assert summary.appended == size - 1 and head(cluster) == size - 1
    with closing(open_store(cluster.db)) as store:
        assert query(store, "SELECT size FROM checkpoints ORDER BY size") == [(size,)]


@pytest.mark.parametrize("held", ["genesis", "all"])
def test_a_held_head_record_lost_from_the_store_is_a_gap_there(cluster: Cluster,
                                                                held: str) -> None:
    """Nothing is appended without the record the new rows must link to."""
    if held == "genesis":
        hold_genesis_only(cluster)
    else:
        assert merge(cluster, cluster.n1).ok
    at = head(cluster)
    assert at is not None
    if held == "all":
        more(cluster, cluster.n1, "300")
    execute(cluster.db, "DELETE FROM records WHERE seq = ?", (at,))
    summary = merge(cluster, cluster.n1)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
        ("GAP", "n1", at, f"the head node lost record {at}")]
    assert summary.appended == 0 and head(cluster) == at


def test_a_row_before_the_genesis_record_is_a_gap_at_zero(cluster: Cluster) -> None:
    """A ledger with a row at seq -1 does not start with its genesis record."""
    tamper.sql(cluster.n1, "INSERT INTO per SELECT -1, time_ns, kind, job_id, body,"
               " prev_hash, hash, mac, key_id FROM per WHERE seq = 0")
    summary = merge(cluster, cluster.n1)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
        ("GAP", "n1", 0, "ledger does not start with its genesis record (first seq is -1)")]
    assert summary.appended == 0 and head(cluster) is None


def test_a_segment_not_continuing_the_held_genesis_is_a_fork(cluster: Cluster) -> None:
    """The head node holds n1's genesis; a segment after seq 0 exported from a copy of
    n1 whose history differs from seq 0 on (re-chained, re-MAC'd with n1's K[0])."""
    hold_genesis_only(cluster)
    other = cluster.root / "other.db"
    shutil.copy(cluster.n1, other)
    rows = tamper.rows(other)
    rows[0][1] += 1
    tamper.rewrite(other, rows, k0(cluster))
    seg = export_segment(other, cluster.root / "other.seg", 0).path
    summary = merge(cluster, seg)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
        ("FORK", "n1", 1, "the segment's first record does not continue the chain the head "
         "node holds up to seq 0: the node holds another history")]
    assert summary.appended == 0 and head(cluster) == 0


def test_a_source_refused_at_its_genesis_record_leaves_no_head(cluster: Cluster) -> None:
    tamper.sql(cluster.n1, "UPDATE per SET hash = zeroblob(32) WHERE seq = 0")
    summary = merge(cluster, cluster.n1)
    assert [(f.code, f.seq) for f in summary.findings] == [("TAMPERED", 0)]
    assert summary.appended == 0 and head(cluster) is None
    with closing(open_store(cluster.db)) as store:
        assert query(store, "SELECT count(*) FROM records") == [(0,)]


def test_a_node_named_outside_ascii_merges_whole(cluster: Cluster) -> None:
    """Its records name it as canonical JSON writes it (UTF-8, not \\u escapes)."""
    path = build_node(cluster.root, "nœud-1", cluster.trust, cluster.clock,
                      [("300", [0], {0: 42})])
    summary = merge(cluster, path)
    assert summary.ok, summary.findings
    assert summary.appended == len(tamper.rows(path))


@pytest.mark.parametrize("job", ['a"b', "a\\b", "a\nb", "jöb", "ok-1"])
def test_a_job_id_json_must_escape_merges(cluster: Cluster, job: str) -> None:
    """The envelope's job is canonical JSON; the fast path's shortcut for plain ids
    must not take one that JSON escapes (or writes as UTF-8)."""
    more_job(cluster, job)
    size = len(tamper.rows(cluster.n1))
    summary = merge(cluster, cluster.n1)
    assert summary.ok, summary.findings
    assert summary.appended == size and head(cluster) == size - 1


def more_job(c: Cluster, job: str) -> None:
    keys = c.root / "keys-n1"
    with Ledger.open(c.n1, k0(c), load_signing_key(keys / "node.key"), node="n1",
                     clock=c.clock) as led:
        led.append("cap", {"v": 1, "node": "n1", "job_id": job, "power_mw": 1000})


def test_a_source_starting_past_the_held_head_is_a_gap_naming_what_to_merge(
        cluster: Cluster) -> None:
    """A segment exported after seq 5 onto a head held at 0; a pruned ledger onto a
    store holding nothing, then onto the held genesis: each names the missing seqs
    and what to merge first."""
    with Ledger.open(cluster.n1, k0(cluster),
                     load_signing_key(cluster.root / "keys-n1" / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        led.append_many([("cap", {"v": 1, "node": "n1", "job_id": str(i)})
                         for i in range(led.size, 300)])
    pruned = cluster.root / "pruned.db"
    shutil.copy(cluster.n1, pruned)
    cut = prune_ledger(pruned, cluster.root / "a1.seg", before_seq=256, align=256).cut
    assert cut == 256
    tail = "and this node ledger was pruned before seq {}: merge {} first (sparkctl ledger " \
        "prune wrote them)".format(cut, "a1.seg")

    def gap(source: Path | str) -> list[tuple[str, str, int | None, str]]:
        summary = merge(cluster, source)
        assert summary.appended == 0
        return [(f.code, f.node, f.seq, f.detail) for f in summary.findings]

    assert gap(pruned) == [("GAP", "n1", 0, f"the head node holds nothing of node 'n1', {tail}")]
    hold_genesis_only(cluster)
    assert gap(pruned) == [("GAP", "n1", 1, f"the head node holds up to seq 0, {tail}")]
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", 5).path
    assert gap(seg) == [("GAP", "n1", 1, "the head node holds up to seq 0, this segment starts "
                         "at seq 6: seqs 1..5 are missing (export --after 0)")]
    assert head(cluster) == 0
