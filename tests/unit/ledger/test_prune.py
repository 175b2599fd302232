"""Pruning a node ledger: the archive holds what goes, what stays still verifies
(sequentially and on every core), every edit below or at the cut is caught, the
writer carries on, the head node merges archive then ledger, and bad requests get
a clear error with nothing removed."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.state import GOVERNING_KINDS, governed_latest
from spark_slurm.errors import LedgerError, UnknownJob, WitnessError
from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.witness import proof_from_ledger
from spark_slurm.ledger import Checkpoint, Ledger, verify_ledger
from spark_slurm.ledger.checkpoint import parse_checkpoint
from spark_slurm.ledger.cut import cut_of
from spark_slurm.ledger.prune import PruneResult, prune_ledger
from spark_slurm.ledger.schema import open_existing
from spark_slurm.ledger.segment import export_segment
from spark_slurm.ledger.verify_par import walk_parallel
from spark_slurm.ledger.verify_walk import Walk, walk
from tests.unit.ledger.conftest import Keys, needs_shell_tools, shell_verify
from tests.unit.ledger.test_cli import sparkctl

ALIGN = 256  # the library's cut grain, small enough for a test ledger


@dataclass
class Node:
    path: Path
    keys: Keys
    clock: ManualClock
    signing: Ed25519PrivateKey
    kept: Checkpoint
    hmac: bytes | None


def _write(led: Ledger, clock: ManualClock, n: int, start: int) -> None:
    for i in range(start, start + n):
        if i % 97 == 5 and i < 700:  # journal ingest records (sparkd resumes from the newest)
            led.append("oob", {"v": 1, "node": led.node, "source": "journal", "gpu": 0,
                               "cursor": f"c{i}"})
        elif i % 211 == 7:
            led.append("policy", {"v": 1, "node": led.node, "sha256": f"{i:064x}"})
        else:  # GPUs 0-3 governed all along; GPU 7 last set long before any cut
            gpu = 7 if i in (300, 301) else i % 4
            led.append("cap" if i % 3 else "restore",
                       {"v": 1, "node": led.node, "job_id": str(100 + i // 50),
                        "power_mw": 1000 * i,
                        "gpus": [{"index": gpu, "intended_mw": 100_000 + 1000 * i}]})
        clock.advance(7)


@pytest.fixture
def node(tmp_path: Path, keys: Keys) -> Callable[..., Node]:
    def make(n: int = 1200, hmac: bool = True) -> Node:
        clock = ManualClock()
        path = tmp_path / "node.db"
        led = Ledger.open(path, keys.hmac if hmac else None, keys.signing, node="n1",
                          cluster="c1", clock=clock, epoch_seconds=900)
        _write(led, clock, n // 2, 0)
        new = Ed25519PrivateKey.generate()
        led.rotate_signing_key(new)
        for i in range(n // 2, n, 100):
            _write(led, clock, min(100, n - i), i)
            led.maintain()
            led.checkpoint()
        kept = led.checkpoint()
        led.close()
        return Node(path, keys, clock, new, kept, keys.hmac if hmac else None)

    return make


def _prune(n: Node, archive: str, *, before_seq: int | None = None,
           before_ns: int | None = None) -> PruneResult:
    return prune_ledger(n.path, n.path.parent / archive, align=ALIGN, clock=n.clock,
                        before_seq=before_seq, before_ns=before_ns)


def _rows(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


def test_prune_archives_then_removes_and_what_stays_verifies(node: Callable[..., Node]) -> None:
    n = node()
    before = verify_ledger(n.path, n.hmac)
    journal_newest = max(s for (s,) in _rows(n.path, "SELECT seq FROM per WHERE instr(body, "
                                                     "'\"source\":\"journal\"') > 0"))
    done = _prune(n, "a1.seg", before_seq=1000)
    assert (done.previous, done.cut, done.why) == (0, 768, "")
    held = [s for (s,) in _rows(n.path, "SELECT seq FROM per WHERE seq < 768 ORDER BY seq")]
    kinds = dict(_rows(n.path, "SELECT seq, kind FROM per WHERE seq < 768"))
    assert held[0] == 0 and kinds[0] == "genesis"
    assert {"key", "policy"} <= set(kinds.values())
    assert set(kinds.values()) <= {"genesis", "key", "policy", "oob", "cap", "restore"}
    # of the limit-setting records, one per GPU at most (the newest that set it)
    assert 1 <= sum(k in ("cap", "restore") for k in kinds.values()) <= 5
    assert [s for s, k in kinds.items() if k == "oob"] == [journal_newest]  # only the newest
    assert done.kept == len(held) and done.removed == 768 - len(held)
    assert done.archived == 768  # every record before the cut, in the archive
    assert _rows(n.path, "SELECT count(*) FROM checkpoint WHERE size < 768") == [(0,)]
    after = verify_ledger(n.path, n.hmac, n.signing.public_key(), [n.kept])
    assert after.ok, after.reason
    assert (after.count, after.head, after.first_seq) == (before.count, before.head, 768)
    assert "pruned before seq 768" in after.summary()


def _governed(path: Path) -> dict[int, int]:
    with Ledger.open(path, cluster="c1") as led:
        return governed_latest(led.records_newest_first(kinds=list(GOVERNING_KINDS)),
                               [0, 1, 2, 3, 7])


def test_sparkd_reads_the_same_governed_limits_after_a_prune(node: Callable[..., Node]) -> None:
    """Start-up takes each GPU's governed limit from the newest record that set it: the
    prune keeps that record for a GPU last set before the cut (GPU 7 here)."""
    n = node()
    before = _governed(n.path)
    assert before[7] == 100_000 + 1000 * 301  # last set at i = 301, long before the cut
    _prune(n, "a1.seg", before_seq=800)
    assert _governed(n.path) == before
    assert verify_ledger(n.path, n.hmac).ok


def test_a_pruned_ledger_verifies_the_same_on_every_core(node: Callable[..., Node]) -> None:
    n = node(n=1400)
    cut = _prune(n, "a1.seg", before_seq=768).cut
    assert cut == 768
    conn, meta = open_existing(n.path)
    try:
        conn.execute("BEGIN")
        need = {768, 800, 1024, 1100, 5000}  # the last one past the end
        ref, par = Walk(meta, n.hmac, set(need)), Walk(meta, n.hmac, set(need))
        walk(conn, ref, cut_of(meta, "x"))
        # chunks of 2^8 records from the cut: the first starts at the cut itself
        assert walk_parallel(conn, n.path, par, n.hmac, procs=2, chunk_bits=8,
                             cut=cut_of(meta, "x"))
        # a cut off the chunk grid goes sequential
        assert not walk_parallel(conn, n.path, Walk(meta, n.hmac, set()), n.hmac, procs=2,
                                 chunk_bits=9, cut=cut_of(meta, "x"))
    finally:
        conn.close()
    assert (par.count, par.head, par.chain.hashes, par.roots, par.subtrees, par.latest,
            par.epoch, par.node) == (ref.count, ref.head, ref.chain.hashes, ref.roots,
                                     ref.subtrees, ref.latest, ref.epoch, ref.node)
    assert set(ref.roots) == {768, 800, 1024, 1100}


def test_the_writer_carries_on_and_a_second_prune_extends_the_cut(
        node: Callable[..., Node]) -> None:
    n = node()
    _prune(n, "a1.seg", before_seq=800)
    led = Ledger.open(n.path, n.hmac, n.signing, node="n1", cluster="c1", clock=n.clock,
                      epoch_seconds=900)
    _write(led, n.clock, 400, 1200)
    led.maintain()
    led.checkpoint()
    led.close()
    assert verify_ledger(n.path, n.hmac).ok
    second = _prune(n, "a2.seg", before_seq=1300)
    assert (second.previous, second.cut, second.archived) == (768, 1280, 1280 - 768)
    report = verify_ledger(n.path, n.hmac, n.signing.public_key())
    assert report.ok, report.reason
    assert report.first_seq == 1280
    cut = cut_of(dict(_rows(n.path, "SELECT key, value FROM meta")), "x")
    assert cut is not None and cut.archives == ("a1.seg", "a2.seg")
    assert {size for size, _ in cut.kept.values()} == {768, 1280}  # earlier proofs stand
    before = n.path.stat().st_size
    vacuum = sqlite3.connect(n.path, isolation_level=None)
    vacuum.execute("VACUUM")  # as docs/head-node.md says (sqlite3 LEDGER ...)
    vacuum.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    vacuum.close()
    assert n.path.stat().st_size < before
    assert verify_ledger(n.path, n.hmac, n.signing.public_key()).ok


def test_archives_then_the_pruned_ledger_merge_on_the_head(node: Callable[..., Node],
                                                           tmp_path: Path) -> None:
    n = node()
    _prune(n, "a1.seg", before_seq=800)
    db = tmp_path / "cluster.db"
    gap = merge_ledgers(db, [str(n.path)]).findings
    assert [f.code for f in gap] == ["GAP"]
    assert "pruned before seq 768" in gap[0].detail and "a1.seg" in gap[0].detail
    archived = merge_ledgers(db, [str(n.path.parent / "a1.seg")])
    assert (archived.findings, archived.appended) == ([], 768)
    rest = merge_ledgers(db, [str(n.path)])
    size = verify_ledger(n.path).count
    assert (rest.findings, rest.appended) == ([], size - 768)
    assert merge_ledgers(db, [str(n.path)]).appended == 0


def test_audit_of_a_pruned_node_ledger(node: Callable[..., Node]) -> None:
    n = node()
    _prune(n, "a1.seg", before_seq=800)
    late = audit_job(n.path, "120")  # after the cut: proven as before
    assert late.ok, late.problems
    own = {s for (s,) in _rows(n.path, "SELECT seq FROM per WHERE job_id = '120'")}
    assert len(own) == 50 and min(own) > 768
    assert {e.seq for e in late.timeline} >= own
    assert all(e.verification.ok and e.verification.proof for e in late.timeline)
    with pytest.raises(UnknownJob, match=r"job 101: no records in .* \(records before seq 768 "
                       r"were pruned into a1\.seg"):
        audit_job(n.path, "101")


def test_the_witness_proof_from_a_pruned_snapshot(node: Callable[..., Node],
                                                  tmp_path: Path) -> None:
    n = node()
    whole = tmp_path / "whole.db"
    shutil.copy(n.path, whole)
    size = verify_ledger(n.path).count
    _prune(n, "a1.seg", before_seq=800)
    assert proof_from_ledger(n.path, 1000, size) == proof_from_ledger(whole, 1000, size)
    assert proof_from_ledger(n.path, 512, size) == proof_from_ledger(whole, 512, size)
    with pytest.raises(WitnessError, match="pruned before seq 768: the proof from size 700 "
                       "needs records it no longer holds"):
        proof_from_ledger(n.path, 700, size)


def test_export_before_the_cut_is_refused(node: Callable[..., Node]) -> None:
    n = node()
    _prune(n, "a1.seg", before_seq=800)
    with pytest.raises(LedgerError, match=r"records before seq 768 were pruned .*a1\.seg.*"
                       r"--after 767"):
        export_segment(n.path, n.path.parent / "x.seg", after=100)
    seg = export_segment(n.path, n.path.parent / "x.seg", after=767)
    assert seg.rows == verify_ledger(n.path).count - 768


def _set(path: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(sql, args)


def _kept_policy(path: Path) -> int:
    seq = _rows(path, "SELECT min(seq) FROM per WHERE kind = 'policy'")[0][0]
    assert isinstance(seq, int)
    return seq


def _rehash(path: Path, seq: int, body: bytes) -> None:
    prev = _rows(path, "SELECT prev_hash FROM per WHERE seq = ?", seq)[0][0]
    assert isinstance(prev, bytes)
    _set(path, "UPDATE per SET body = ?, hash = ? WHERE seq = ?", body,
         hashlib.sha256(prev + body).digest(), seq)


def _edit_kept_body(path: Path) -> None:
    seq = _kept_policy(path)
    body = _rows(path, "SELECT body FROM per WHERE seq = ?", seq)[0][0]
    assert isinstance(body, bytes)
    _rehash(path, seq, body.replace(b'"sha256":"', b'"sha256":"f'))


def _edit_cut(path: Path, change: Callable[[dict[str, object]], None]) -> None:
    raw = json.loads(str(_rows(path, "SELECT value FROM meta WHERE key = 'cut'")[0][0]))
    change(raw)
    _set(path, "UPDATE meta SET value = ? WHERE key = 'cut'", json.dumps(raw))


def _drop_proof(raw: dict[str, object]) -> None:
    kept = raw["kept"]
    assert isinstance(kept, dict)
    del kept[max(kept, key=int)]


def _first_subtree_at_level_9(path: Path) -> None:
    _set(path, "UPDATE tree SET hash = zeroblob(32) WHERE level = 9 AND idx = 0")


def _old_checkpoint_back(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("ATTACH DATABASE ? AS a", (str(path.parent / "a1.seg"),))
        assert conn.execute("INSERT INTO checkpoint (size, time_ns, key_id, text) SELECT size,"
                            " time_ns, key_id, text FROM a.checkpoint WHERE size < 768"
                            " LIMIT 1").rowcount == 1


TAMPER: dict[str, tuple[Callable[[Path], None], str]] = {
    # an unkeyed ledger: the hash is rewritten with the body, only the proof catches it
    "kept record rewritten": (_edit_kept_body, "not in the Merkle tree of its cut"),
    "kept record deleted": (lambda p: _set(p, "DELETE FROM per WHERE seq = ?", _kept_policy(p)),
                            "is missing"),
    "its proof dropped": (lambda p: _edit_cut(p, _drop_proof), "lists no proof for it"),
    "record put back below the cut": (
        lambda p: _set(p, "INSERT INTO per SELECT seq - 768 + 3, time_ns, kind, job_id, body,"
                          " prev_hash, hash, mac, key_id FROM per WHERE seq = 900"),
        "lists no proof for it"),
    "subtree below the cut": (lambda p: _set(p, "UPDATE tree SET hash = zeroblob(32) WHERE "
                                                "level = 8 AND idx = 1"),
                              "is not the hash of its two halves"),
    "subtree in the cut's compact range": (
        lambda p: _set(p, "UPDATE tree SET hash = zeroblob(32) WHERE level = 9 AND idx = 0"),
        "is not the hash of its two halves"),
    "subtree row removed": (lambda p: _set(p, "DELETE FROM tree WHERE level = 8 AND idx = 0"),
                            "is not the hash of its two halves"),
    "stray subtree row": (lambda p: _set(p, "INSERT INTO tree VALUES (7, 0, zeroblob(32))"),
                          "holds 5 subtrees under the cut"),
    "cut moved back": (lambda p: _edit_cut(p, lambda raw: raw.update(seq=512)),
                       "which is not below it"),
    "cut moved on": (lambda p: _edit_cut(p, lambda raw: raw.update(seq=1024)),
                     "is below the cut at seq 1024 but the cut lists no proof"),
    "cut malformed": (lambda p: _set(p, "UPDATE meta SET value = '{\"seq\": 7}' WHERE key = "
                                        "'cut'"), "cut (meta row 'cut') is malformed"),
    "anchor rewritten": (lambda p: _set(p, "UPDATE per SET prev_hash = zeroblob(32) WHERE "
                                           "seq = 768"),
                         "hash does not match prev hash"),
    "old checkpoint put back": (_old_checkpoint_back, "is before the cut at seq 768"),
    "every checkpoint removed": (lambda p: _set(p, "DELETE FROM checkpoint"),
                                 "no checkpoint covers the cut at seq 768"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_every_edit_below_or_at_the_cut_is_caught(node: Callable[..., Node], case: str) -> None:
    n = node(hmac=False)
    _prune(n, "a1.seg", before_seq=800)
    assert verify_ledger(n.path).ok
    edit, why = TAMPER[case]
    edit(n.path)
    report = verify_ledger(n.path)
    assert not report.ok
    assert why in report.reason


def test_a_kept_checkpoint_before_the_cut_cannot_be_checked(node: Callable[..., Node]) -> None:
    n = node()
    early = _rows(n.path, "SELECT text FROM checkpoint WHERE size < 768 LIMIT 1")[0][0]
    _prune(n, "a1.seg", before_seq=800)
    with pytest.raises(LedgerError, match="is before the ledger's cut at seq 768: check it "
                       "against the archive"):
        verify_ledger(n.path, n.hmac, checkpoints=[parse_checkpoint(str(early))])


def test_nothing_to_prune_leaves_everything(node: Callable[..., Node]) -> None:
    n = node()
    first = _prune(n, "a0.seg", before_seq=200)
    assert first.cut == 0 and first.removed == 0 and "no multiple of 256" in first.why
    assert not (n.path.parent / "a0.seg").exists()
    assert verify_ledger(n.path, n.hmac).first_seq == 0


def test_prune_refuses_what_it_cannot_do_safely(node: Callable[..., Node],
                                                tmp_path: Path) -> None:
    n = node()
    (tmp_path / "taken.seg").write_bytes(b"x")
    with pytest.raises(LedgerError, match="exists; a prune never overwrites an archive"):
        _prune(n, "taken.seg", before_seq=800)
    with pytest.raises(LedgerError, match="multiple of 256 records, not 300"):
        prune_ledger(n.path, tmp_path / "a.seg", before_seq=800, align=300)
    with pytest.raises(LedgerError, match="no such ledger file"):
        prune_ledger(tmp_path / "nope.db", tmp_path / "a.seg", before_seq=800)
    assert _rows(n.path, "SELECT count(*), min(seq) FROM per") == [(verify_ledger(n.path).count, 0)]
    clock = ManualClock()
    bare = Ledger.open(tmp_path / "bare.db", None, None, node="n2", cluster="c1", clock=clock)
    _write(bare, clock, 600, 0)
    bare.close()
    none = prune_ledger(tmp_path / "bare.db", tmp_path / "b.seg", before_seq=600, align=ALIGN)
    assert none.removed == 0 and "no checkpoint" in none.why


def test_prune_before_a_time(node: Callable[..., Node]) -> None:
    n = node()
    t = _rows(n.path, "SELECT time_ns FROM per WHERE seq = 530")[0][0]
    assert isinstance(t, int)
    assert _prune(n, "a1.seg", before_ns=t).cut == 512


def test_cli_prune_and_verify(node: Callable[..., Node],
                              capsys: pytest.CaptureFixture[str]) -> None:
    n = node()
    archive = str(n.path.parent / "a.seg")
    code, _, err = sparkctl(capsys, "ledger", "prune", str(n.path), "--archive", archive)
    assert code == 2 and "--before TIME and --before-seq SEQ" in err
    code, _, err = sparkctl(capsys, "ledger", "prune", str(n.path), "--before", "yesterday",
                            "--archive", archive)
    assert (code, err) == (2, "sparkctl: --before 'yesterday': not ISO-8601, Unix seconds or "
                              "Unix ns\n")
    # the CLI cuts on the production grain (16384 records): nothing in this ledger
    code, out, _ = sparkctl(capsys, "ledger", "prune", str(n.path), "--before-seq", "1000",
                            "--archive", archive, "--json")
    assert code == 0
    assert json.loads(out)["removed"] == 0 and "no multiple of 16384" in json.loads(out)["why"]
    code, out, _ = sparkctl(capsys, "ledger", "prune", str(n.path), "--before-seq", "1000",
                            "--archive", archive)
    assert code == 0 and "nothing pruned: no multiple of 16384" in out
    code, out, _ = sparkctl(capsys, "ledger", "prune", str(n.path), "--before-seq", "1000",
                            "--archive", archive, "--dry-run")
    assert (code, out) == (0, f"{n.path}: nothing would be pruned: no multiple of 16384 records"
                              " lies after the genesis and at or before seq 1000, the head (seq "
                              f"{verify_ledger(n.path).count - 1}) and the newest checkpoint "
                              f"(size {verify_ledger(n.path).count})\n")
    dry = prune_ledger(n.path, archive, before_seq=800, align=ALIGN, dry_run=True)
    assert (dry.cut, dry.archive, dry.archived) == (768, None, 0)
    assert not Path(archive).exists() and verify_ledger(n.path).first_seq == 0
    done = _prune(n, "a1.seg", before_seq=800)
    assert (done.removed, done.kept, done.checkpoints_removed) == (
        dry.removed, dry.kept, dry.checkpoints_removed)
    code, out, _ = sparkctl(capsys, "verify", str(n.path))
    assert code == 0 and "(pruned before seq 768)" in out
    code, _, err = sparkctl(capsys, "ledger", "export", str(n.path), "--after", "5", "--out",
                            archive)
    assert code == 2 and "records before seq 768 were pruned" in err


@needs_shell_tools
def test_the_shell_verifier_says_it_checks_whole_ledgers_only(node: Callable[..., Node]) -> None:
    n = node()
    _prune(n, "a1.seg", before_seq=800)
    code, out = shell_verify(n.path)
    assert code == 2 and "pruned before seq 768" in out and "sparkctl verify" in out
