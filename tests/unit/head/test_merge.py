"""Merge: healthy nodes, idempotence, and every tamper/fork case named by node and seq."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.head.merge import MergeSummary, merge_ledgers
from spark_slurm.head.store import Finding, open_store
from spark_slurm.head.witness import witness_file
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key
from tests.unit.head import tamper
from tests.unit.head.builders import build_node, write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import dump, node_rows, query

pytestmark = pytest.mark.both_stores


def merge(c: Cluster, *sources: Path | str, witness: Path | None = None) -> MergeSummary:
    return merge_ledgers(c.db, [str(s) for s in sources], keys_dir=c.trust,
                         witness_state=witness, clock=c.clock)


def only(summary: MergeSummary, node: str) -> list[Finding]:
    return [f for f in summary.findings if f.node == node]


def assert_healthy_n2(summary: MergeSummary) -> None:
    n2 = next(r for r in summary.results if r.node == "n2")
    assert n2.ok and n2.appended > 0 and not only(summary, "n2")


def test_merge_two_healthy_nodes_copies_records_byte_for_byte(cluster: Cluster) -> None:
    summary = merge(cluster, cluster.n1, cluster.n2)
    assert summary.ok and not summary.findings
    for node, path in (("n1", cluster.n1), ("n2", cluster.n2)):
        stored = node_rows(cluster.db, node)
        assert stored == tamper.rows(path)
        with closing(open_store(cluster.db)) as db:
            state = db.node(node)
        assert state is not None
        assert state.count == len(stored) and state.head_seq == len(stored) - 1


def test_merge_twice_changes_nothing(cluster: Cluster) -> None:
    merge(cluster, cluster.n1, cluster.n2)
    before = dump(cluster.db)
    again = merge(cluster, cluster.n1, cluster.n2)
    assert again.ok and again.appended == 0
    assert [r.read for r in again.results] == [0, 0]  # nothing new: no row is copied
    assert dump(cluster.db) == before


def test_merge_is_incremental(cluster: Cluster, tmp_path: Path) -> None:
    merge(cluster, cluster.n1, cluster.n2)
    size = len(tamper.rows(cluster.n1))
    keys = tmp_path / "keys-n1"
    with Ledger.open(cluster.n1, None, load_signing_key(keys / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        write_job(led, cluster.clock, "n1", "300", [0], {0: 42})
    summary = merge(cluster, cluster.n1, cluster.n2)
    assert summary.ok
    n1 = next(r for r in summary.results if r.node == "n1")
    assert n1.appended == len(tamper.rows(cluster.n1)) - size > 0
    assert [r.appended for r in summary.results if r.node == "n2"] == [0]


def test_tampered_node_is_reported_and_others_still_merge_idempotently(cluster: Cluster) -> None:
    tamper.sql(cluster.n1, "UPDATE per SET body = replace(body, 'alice', 'mallo') WHERE seq=3")
    first = merge(cluster, cluster.n1, cluster.n2)
    assert not first.ok
    assert next((f.code, f.node, f.seq) for f in only(first, "n1")) == ("TAMPERED", "n1", 3)
    assert_healthy_n2(first)
    before = dump(cluster.db)
    second = merge(cluster, cluster.n1, cluster.n2)
    assert [(f.code, f.seq) for f in second.findings] == [(f.code, f.seq) for f in first.findings]
    assert dump(cluster.db) == before  # findings are recorded once
    with closing(open_store(cluster.db)) as db:
        assert ("TAMPERED", "n1", 3) in [(f.code, f.node, f.seq) for f in db.findings()]
        n1 = db.node("n1")
        assert n1 is not None and n1.head_seq == 2  # the verified prefix is kept


@pytest.mark.parametrize(("damage", "code", "seq"), [
    ("UPDATE per SET hash = randomblob(32) WHERE seq=4", "TAMPERED", 4),
    ("UPDATE per SET mac = randomblob(32) WHERE seq=5", "TAMPERED", 5),
    ("UPDATE per SET time_ns = time_ns + 1 WHERE seq=6", "TAMPERED", 6),
    ("DELETE FROM per WHERE seq=4", "GAP", 4),
    ("UPDATE per SET kind = 'restore' WHERE seq=3", "TAMPERED", 3),
])
def test_row_damage_is_detected_with_node_and_seq(cluster: Cluster, damage: str, code: str,
                                                  seq: int) -> None:
    tamper.sql(cluster.n1, damage)
    summary = merge(cluster, cluster.n1, cluster.n2)
    assert (code, "n1", seq) == next((f.code, f.node, f.seq) for f in only(summary, "n1"))
    assert_healthy_n2(summary)


def test_consistent_rewrite_without_the_key_fails_the_mac(cluster: Cluster) -> None:
    rows = tamper.rows(cluster.n1)
    rows[3][4] = rows[3][4].replace(b"alice", b"mallo")
    tamper.rewrite(cluster.n1, rows, None)  # hashes recomputed; MACs kept from the original
    summary = merge(cluster, cluster.n1, cluster.n2)
    first = only(summary, "n1")[0]
    assert (first.code, first.seq) == ("TAMPERED", 3) and "MAC" in first.detail
    assert_healthy_n2(summary)


def test_key_holder_rewriting_merged_history_is_a_fork(cluster: Cluster,
                                                        tmp_path: Path) -> None:
    assert merge(cluster, cluster.n1, cluster.n2).ok
    rows = tamper.rows(cluster.n1)
    del rows[4]
    k0 = load_hmac_key(tmp_path / "keys-n1" / "hmac.key")
    tamper.rewrite(cluster.n1, rows, k0)  # even with the key, the chain no longer matches
    summary = merge(cluster, cluster.n1, cluster.n2)
    # a key holder can rebuild chain and MACs, but not what the head node already holds
    assert ("FORK", "n1", 4) in [(f.code, f.node, f.seq) for f in only(summary, "n1")]
    assert summary.results[1].ok


def test_inserted_record_is_named(cluster: Cluster) -> None:
    conn = sqlite3.connect(cluster.n1)
    with conn:
        conn.execute("UPDATE per SET seq = seq + 1000 WHERE seq >= 4")
        conn.execute("UPDATE per SET seq = seq - 999 WHERE seq >= 1000")
        row = conn.execute("SELECT time_ns, kind, job_id, body, prev_hash, hash, mac, key_id "
                           "FROM per WHERE seq = 3").fetchone()
        conn.execute("INSERT INTO per (seq, time_ns, kind, job_id, body, prev_hash, hash, mac, "
                     "key_id) VALUES (4, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    conn.close()
    summary = merge(cluster, cluster.n1, cluster.n2)
    first = only(summary, "n1")[0]
    assert first.seq == 4 and first.code in ("DUPLICATE", "TAMPERED")
    assert_healthy_n2(summary)


def test_reordered_records_are_reported(cluster: Cluster) -> None:
    conn = sqlite3.connect(cluster.n1)
    with conn:
        conn.execute("UPDATE per SET seq = -1 WHERE seq = 4")
        conn.execute("UPDATE per SET seq = 4 WHERE seq = 5")
        conn.execute("UPDATE per SET seq = 5 WHERE seq = -1")
    conn.close()
    summary = merge(cluster, cluster.n1, cluster.n2)
    assert next((f.code, f.node, f.seq) for f in only(summary, "n1")) == ("REORDER", "n1", 4)
    assert_healthy_n2(summary)


def test_duplicate_record_appended_again(cluster: Cluster) -> None:
    conn = sqlite3.connect(cluster.n1)
    with conn:
        last = conn.execute("SELECT max(seq) FROM per").fetchone()[0]
        conn.execute("INSERT INTO per (seq, time_ns, kind, job_id, body, prev_hash, hash, mac, "
                     "key_id) SELECT ?, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id "
                     "FROM per WHERE seq = 3", (last + 1,))
    conn.close()
    summary = merge(cluster, cluster.n1, cluster.n2)
    n1 = only(summary, "n1")
    assert ("DUPLICATE", last + 1) in [(f.code, f.seq) for f in n1]
    assert_healthy_n2(summary)


def test_fork_keeps_both_versions_as_evidence(cluster: Cluster, tmp_path: Path) -> None:
    other = tmp_path / "n1-fork.db"
    shutil.copy(cluster.n1, other)
    keys = tmp_path / "keys-n1"
    size = len(tamper.rows(cluster.n1))
    for path, job in ((cluster.n1, "300"), (other, "999")):
        with Ledger.open(path, None, load_signing_key(keys / "node.key"), node="n1",
                         clock=ManualClock()) as led:
            write_job(led, ManualClock(), "n1", job, [0], {0: 1})
    assert merge(cluster, cluster.n1, cluster.n2).ok
    summary = merge(cluster, other)
    assert ("FORK", "n1", size) == next((f.code, f.node, f.seq) for f in only(summary, "n1"))
    with closing(open_store(cluster.db)) as db:
        assert query(db, "SELECT count(*) FROM forks WHERE seq = ?", (size,)) == [(1,)]
        assert [r.job_id for r in db.job_records("300")]  # the first version stays


def test_older_copy_is_a_rollback(cluster: Cluster, tmp_path: Path) -> None:
    old = tmp_path / "n1-old.db"
    shutil.copy(cluster.n1, old)
    with Ledger.open(cluster.n1, None, load_signing_key(tmp_path / "keys-n1" / "node.key"),
                     node="n1", clock=cluster.clock) as led:
        write_job(led, cluster.clock, "n1", "300", [0], {0: 1})
    merge(cluster, cluster.n1, cluster.n2)
    summary = merge(cluster, old, cluster.n2)
    assert "ROLLBACK" in [f.code for f in only(summary, "n1")]
    assert summary.results[1].ok


def test_truncation_below_a_witnessed_checkpoint_is_a_rollback(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    state = tmp_path / "witness"
    (state / "keys").mkdir(parents=True)
    shutil.copy(cluster.trust / "n1.pub", state / "keys" / "n1.pub")
    text = sqlite3.connect(cluster.n1).execute(
        "SELECT text FROM checkpoint ORDER BY id DESC LIMIT 1").fetchone()[0]
    cp_file = tmp_path / "n1.cp"
    cp_file.write_text(text)
    witnessed = witness_file(state, cp_file)
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq >= 12")
    tamper.sql(cluster.n1, "DELETE FROM checkpoint")  # the attacker drops the node's own copy
    summary = merge(cluster, cluster.n1, cluster.n2, witness=state)
    assert ("ROLLBACK", "n1", 12) in [(f.code, f.node, f.seq) for f in only(summary, "n1")]
    assert witnessed.size > 12
    assert_healthy_n2(summary)


def test_unknown_keys_refuse_the_node(cluster: Cluster, tmp_path: Path) -> None:
    (cluster.trust / "n1.pub").unlink()
    (cluster.trust / "n1.hmac").unlink()
    summary = merge(cluster, cluster.n1, cluster.n2)
    assert [(f.code, f.node) for f in only(summary, "n1")] == [("UNKNOWN_KEY", "n1")]
    assert_healthy_n2(summary)
    impostor = keygen(tmp_path / "impostor")
    shutil.copy(impostor.public_key, cluster.trust / "n1.pub")
    summary = merge(cluster, cluster.n1)
    assert [(f.code, f.seq) for f in summary.findings] == [("UNKNOWN_KEY", 0)]


def test_foreign_origin_file_and_record(cluster: Cluster, tmp_path: Path) -> None:
    summary = merge(cluster, f"n1={cluster.n2}")
    assert [(f.code, f.node, f.seq) for f in summary.findings] == [("FOREIGN_ORIGIN", "n1", 0)]
    with Ledger.open(cluster.n1, None, load_signing_key(tmp_path / "keys-n1" / "node.key"),
                     node="n1", clock=cluster.clock) as led:
        receipt = led.append("drift", {"v": 1, "node": "n2", "gpu": 0, "expected_mw": 1,
                                       "observed_mw": 2, "cause": "out-of-band",
                                       "action": "record"})
    summary = merge(cluster, cluster.n1, cluster.n2)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
        ("FOREIGN_ORIGIN", "n1", receipt.seq, "record names node 'n2'")]
    assert_healthy_n2(summary)


def test_missing_epoch_seal_is_an_epoch_gap(cluster: Cluster, tmp_path: Path) -> None:
    clock = ManualClock()
    trust = tmp_path / "trust"
    path = build_node(tmp_path, "n3", trust, clock, [])
    k0 = load_hmac_key(tmp_path / "keys-n3" / "hmac.key")
    signing = load_signing_key(tmp_path / "keys-n3" / "node.key")
    with Ledger.open(path, None, signing, node="n3", clock=clock) as led:
        clock.advance(3600 * 2)  # two epochs pass: both sealed on the next write
        led.append("fault", {"v": 1, "node": "n3", "gpu": 0, "error": "GpuLost"})
    rows = tamper.rows(path)
    seals = [i for i, r in enumerate(rows) if r[2] == "key"]
    assert len(seals) == 2
    del rows[seals[1]]
    tamper.rewrite(path, rows, k0)  # a key thief rebuilds chain and MACs, minus one seal
    summary = merge_ledgers(cluster.db, [str(path)], keys_dir=trust, clock=clock)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings][:1] == [
        ("EPOCH_GAP", "n3", seals[1], "epoch 1 was never sealed")]


def test_unusable_source_is_an_error_not_a_crash(cluster: Cluster) -> None:
    junk = cluster.root / "junk.db"
    junk.write_text("not a ledger")
    summary = merge(cluster, junk, cluster.n2)
    assert not summary.ok and summary.results[0].error and "not a ledger" in \
        summary.results[0].error
    assert_healthy_n2(summary)


def test_concurrent_merges_into_one_file_do_not_collide(cluster: Cluster) -> None:
    import threading  # noqa: PLC0415

    db = cluster.db
    merge_ledgers(db, [], keys_dir=cluster.trust)  # create the store first
    results: list[MergeSummary] = []

    def go() -> None:
        results.append(merge_ledgers(db, [str(cluster.n1), str(cluster.n2)],
                                     keys_dir=cluster.trust))

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.ok for r in results)
    assert sum(r.appended for r in results) == len(tamper.rows(cluster.n1)) + len(
        tamper.rows(cluster.n2))


def test_worker_processes_give_the_same_result(cluster: Cluster, tmp_path: Path) -> None:
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq = 6")
    sources = [str(cluster.n1), str(cluster.n2), str(tmp_path / "missing.db")]
    a, b = cluster.another_store("a"), cluster.another_store("b")
    one = merge_ledgers(a, sources, keys_dir=cluster.trust, workers=1)
    two = merge_ledgers(b, sources, keys_dir=cluster.trust, workers=2)
    assert one.to_json()["findings"] == two.to_json()["findings"]
    assert [r.appended for r in one.results] == [r.appended for r in two.results]
    assert two.results[2].error is not None and "missing.db" in two.results[2].error
    assert any(ln.startswith("records:") for ln in dump(a))
    assert dump(a) == dump(b)


def test_a_finding_without_a_seq_is_recorded_once(cluster: Cluster) -> None:
    """A bad checkpoint signature names no seq; merging again must not add it again."""
    conn = sqlite3.connect(cluster.n1)
    text = conn.execute("SELECT text FROM checkpoint ORDER BY id DESC LIMIT 1").fetchone()[0]
    conn.close()
    lines = text.split("\n")
    lines[2] = "A" * 43 + "="  # another root under the same signature
    tamper.sql(cluster.n1, "UPDATE checkpoint SET text = ? WHERE id = (SELECT max(id) FROM "
               "checkpoint)", ("\n".join(lines),))
    first = merge(cluster, cluster.n1)
    assert [f.seq for f in first.findings] == [None]
    merge(cluster, cluster.n1)
    with closing(open_store(cluster.db)) as db:
        assert len(db.findings("n1")) == 1
