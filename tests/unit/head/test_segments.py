"""Segments (`sparkctl ledger export --after SEQ`) and positions: nightly cost ∝ new rows.

A segment holds only what the node wrote after the head node's position; merging it
must give the store a merge of the whole ledger would, and everything that makes a
whole ledger untrustworthy (a fork, a rollback, a gap, a tampered record) must still
be found from the segment alone and what the store holds.
"""

from __future__ import annotations

import json
import shutil
from contextlib import closing
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.head.merge import MergeSummary, merge_ledgers, positions
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from spark_slurm.ledger.segment import export_segment
from tests.unit.head import tamper
from tests.unit.head.builders import write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import dump, query

pytestmark = pytest.mark.both_stores


def merge(c: Cluster, *sources: Path | str, db: str | None = None) -> MergeSummary:
    return merge_ledgers(db or c.db, [str(s) for s in sources], keys_dir=c.trust,
                         clock=c.clock)


def more(c: Cluster, node: str, path: Path, job: str, *, checkpoint: bool = True) -> None:
    keys = c.root / f"keys-{node}"
    with Ledger.open(path, load_hmac_key(keys / "hmac.key"), load_signing_key(keys / "node.key"),
                     node=node, clock=c.clock) as led:
        write_job(led, c.clock, node, job, [0], {0: 42})
        if checkpoint:
            led.checkpoint()


def head(c: Cluster, node: str) -> int:
    (state,) = positions(c.db, [node])
    return -1 if state.head_seq is None else state.head_seq


def found(summary: MergeSummary) -> list[tuple[str, str, int | None]]:
    return [(f.code, f.node, f.seq) for f in summary.findings]


def test_a_segment_merges_to_the_store_the_whole_ledger_gives(cluster: Cluster) -> None:
    whole = cluster.another_store("whole")
    assert merge(cluster, cluster.n1, cluster.n2).ok
    assert merge(cluster, cluster.n1, cluster.n2, db=whole).ok
    more(cluster, "n1", cluster.n1, "300")
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", head(cluster, "n1"))
    assert seg.rows == len(tamper.rows(cluster.n1)) - head(cluster, "n1") - 1 > 0
    assert seg.checkpoints >= 1 and seg.size == len(tamper.rows(cluster.n1))
    summary = merge(cluster, seg.path)
    assert summary.ok and summary.appended == seg.rows
    assert summary.results[0].read == seg.rows
    assert merge(cluster, cluster.n1, db=whole).ok
    assert dump(cluster.db) == dump(whole)
    again = merge(cluster, seg.path, cluster.n1)  # idempotent, whichever form comes
    assert again.ok and again.appended == 0 and dump(cluster.db) == dump(whole)


def test_a_full_segment_into_an_empty_store(cluster: Cluster) -> None:
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", -1)
    assert merge(cluster, seg.path).ok
    whole = cluster.another_store("whole")
    assert merge(cluster, cluster.n1, db=whole).ok
    assert dump(cluster.db) == dump(whole)


@pytest.mark.parametrize("form", ["ledger", "segment"])
def test_a_rollback_of_exactly_one_record_is_reported(cluster: Cluster, form: str) -> None:
    """An older copy one record short of what the head holds (issue 21's survivor)."""
    assert merge(cluster, cluster.n1).ok
    held = head(cluster, "n1")
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq = ?", (held,))
    source = cluster.n1 if form == "ledger" else \
        export_segment(cluster.n1, cluster.root / "n1.seg", held).path
    summary = merge(cluster, source)
    assert ("ROLLBACK", "n1", held) in found(summary)
    assert summary.appended == 0 and head(cluster, "n1") == held


def test_nothing_new_is_not_a_rollback(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", head(cluster, "n1"))
    assert seg.rows == 0
    summary = merge(cluster, seg.path, cluster.n1)
    assert summary.ok and summary.appended == 0


def test_a_segment_that_starts_past_the_head_is_a_gap(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    held = head(cluster, "n1")
    more(cluster, "n1", cluster.n1, "300")
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", held + 2)
    summary = merge(cluster, seg.path)
    assert found(summary) == [("GAP", "n1", held + 1)]
    assert "--after" in summary.findings[0].detail and head(cluster, "n1") == held


def test_a_partial_segment_of_an_unknown_node_asks_for_a_full_one(cluster: Cluster) -> None:
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", 3)
    summary = merge(cluster, seg.path)
    assert found(summary) == [("GAP", "n1", 0)] and "--after -1" in summary.findings[0].detail


def test_a_node_that_rewrote_its_history_is_a_fork_from_its_segment(cluster: Cluster) -> None:
    """The node's new records no longer link to what the head holds."""
    assert merge(cluster, cluster.n1).ok
    held = head(cluster, "n1")
    rows = tamper.rows(cluster.n1)
    del rows[4]
    tamper.rewrite(cluster.n1, rows, load_hmac_key(cluster.root / "keys-n1" / "hmac.key"))
    more(cluster, "n1", cluster.n1, "300", checkpoint=False)
    more(cluster, "n1", cluster.n1, "301", checkpoint=False)
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", held)
    summary = merge(cluster, seg.path)
    assert found(summary)[0] == ("FORK", "n1", held + 1) and summary.appended == 0
    whole = merge(cluster, cluster.n1)
    assert ("FORK", "n1", 4) in found(whole)  # the whole ledger shows where they part


def test_an_overlapping_segment_is_compared_with_what_is_held(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    held = head(cluster, "n1")
    more(cluster, "n1", cluster.n1, "300")
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", held - 5)
    summary = merge(cluster, seg.path)
    assert summary.ok and summary.appended == len(tamper.rows(cluster.n1)) - held - 1
    other = cluster.root / "fork.db"
    shutil.copy(cluster.n1, other)
    rows = tamper.rows(other)
    rows[held - 2][1] += 1  # another time: another record at that seq, re-chained
    tamper.rewrite(other, rows, load_hmac_key(cluster.root / "keys-n1" / "hmac.key"))
    forked = merge(cluster, export_segment(other, cluster.root / "fork.seg", held - 5).path)
    assert found(forked) == [("FORK", "n1", held - 2)]
    with closing(open_store(cluster.db)) as store:
        ((first, kept),) = query(store, "SELECT min(seq), count(*) FROM forks")
    assert first == held - 2 and kept > 0  # the node's other side, as evidence


def test_a_record_edited_in_a_segment_is_tampered(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1).ok
    held = head(cluster, "n1")
    more(cluster, "n1", cluster.n1, "300")
    seg = export_segment(cluster.n1, cluster.root / "n1.seg", held)
    tamper.sql(Path(seg.path), "UPDATE per SET body = replace(body, 'alice', 'mallo') "
               "WHERE seq = ?", (held + 2,))
    summary = merge(cluster, seg.path)
    assert found(summary)[0] == ("TAMPERED", "n1", held + 2)
    assert summary.appended == 1 and head(cluster, "n1") == held + 1


def test_a_segment_pinned_to_another_node_is_foreign(cluster: Cluster) -> None:
    assert merge(cluster, cluster.n1, cluster.n2).ok
    more(cluster, "n2", cluster.n2, "300")
    seg = export_segment(cluster.n2, cluster.root / "n2.seg", head(cluster, "n2"))
    summary = merge(cluster, f"n1={seg.path}")
    assert summary.findings and summary.findings[0].node == "n1"
    assert summary.appended == 0


def test_positions_and_export_from_the_cli(cluster: Cluster,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite://{cluster.db}" if cluster.kind == "sqlite" else cluster.db
    assert run(["merge", "--db", url, str(cluster.n1)]) == 0
    capsys.readouterr()
    assert run(["positions", "--db", cluster.db, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (n1,) = doc["nodes"]
    assert n1["node"] == "n1" and n1["head_seq"] == len(tamper.rows(cluster.n1)) - 1
    assert run(["positions", "--db", cluster.db, "--seq", "n1", "n9"]) == 0
    assert capsys.readouterr().out.split() == [str(n1["head_seq"]), "-1"]
    more(cluster, "n1", cluster.n1, "300")
    out = cluster.root / "n1.seg"
    assert run(["ledger", "export", str(cluster.n1), "--after", str(n1["head_seq"]),
                "--out", str(out)]) == 0
    assert "records after seq" in capsys.readouterr().out
    assert run(["merge", "--db", cluster.db, "--json", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["appended"] == len(tamper.rows(cluster.n1)) - n1["head_seq"] - 1


def test_export_to_stdout_is_the_same_segment(cluster: Cluster,
                                              capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert run(["ledger", "export", str(cluster.n1), "--after", "4", "--out", "-"]) == 0
    data = capfdbinary.readouterr().out
    piped = cluster.root / "piped.seg"
    piped.write_bytes(data)
    assert data.startswith(b"SQLite format 3\x00")
    a, b = cluster.another_store("a"), cluster.another_store("b")
    assert merge(cluster, cluster.n1, db=a).ok
    assert merge(cluster, cluster.n1, db=b).ok
    assert merge(cluster, piped, db=b).ok  # rows 5.. already held
    assert dump(a) == dump(b)


def test_export_refuses_bad_input_with_one_line(cluster: Cluster, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a ledger")
    for args in (["ledger", "export", str(junk), "--out", str(tmp_path / "x")],
                 ["ledger", "export", str(tmp_path / "none.db"), "--out", str(tmp_path / "x")],
                 ["ledger", "export", str(cluster.n1), "--after", "-2", "--out", "x"]):
        assert run(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(("sparkctl: ", "Usage")) and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_reinstalled_nodes_segment_names_it_by_its_own_genesis(cluster: Cluster) -> None:
    """A node reinstalled with a new key (which the admin trusts) ships rows that do not
    continue the held chain: a FORK. Its segment's genesis row says who it is now; read
    from the held chain instead, the new key would look unknown."""
    from tests.unit.head.builders import build_node  # noqa: PLC0415

    assert merge(cluster, cluster.n1).ok
    held = head(cluster, "n1")
    fresh_root = cluster.root / "reinstalled"
    fresh_root.mkdir()
    fresh = build_node(fresh_root, "n1", cluster.trust, cluster.clock,
                       [(str(j), [0], {0: 5}) for j in range(500, 500 + held)])
    seg = export_segment(fresh, cluster.root / "n1.seg", held)
    assert seg.rows > 0
    summary = merge(cluster, f"n1={seg.path}")
    # only the FORK: its checkpoint is signed by the new key, which the head node now
    # trusts and follows from the segment's genesis
    assert found(summary) == [("FORK", "n1", held + 1)] and summary.appended == 0
    tamper.sql(Path(seg.path), "DROP TABLE genesis", ())
    blind = merge(cluster, f"n1={seg.path}")
    assert [f.code for f in blind.findings] == ["UNKNOWN_KEY"]
