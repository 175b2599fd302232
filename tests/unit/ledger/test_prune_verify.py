"""`verify_ledger` below a cut names the record at fault, not only the reason.

test_prune.py's tamper grid checks the reason of each edit on an unkeyed ledger.
These check the seq as well, the MACs of the records kept below the cut, a proof
at a size that is no cut, and a genesis whose link was rewritten: below the cut its
neighbour is gone, so only the rule that seq 0 links to the zero hash catches it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import LedgerError
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.checkpoint import parse_checkpoint, sign_checkpoint
from spark_slurm.ledger.cut import CUT_ALIGN, root_at
from spark_slurm.ledger.prune import prune_ledger
from spark_slurm.ledger.verify_par import CHUNK_BITS, workers
from tests.unit.ledger.conftest import Keys, write_records
from tests.unit.ledger.test_prune import (
    Node,
    _edit_kept_body,
    _kept_policy,
    _prune,
    _rows,
    _set,
    node,
)

__all__ = ["node"]  # the fixture, imported from test_prune

CHUNK = 1 << CHUNK_BITS
assert CHUNK == CUT_ALIGN  # a prune cut falls on the parallel walk's chunk grid
CUT = 768  # where _prune(before_seq=800) cuts with test_prune's 256-record grain


def _pruned(make: Callable[..., Node], *, hmac: bool) -> Node:
    n = make(hmac=hmac)
    _prune(n, "a1.seg", before_seq=800)
    report = verify_ledger(n.path, n.hmac)
    assert report.ok and report.first_seq == CUT, report
    return n


def _set_proof_size(path: Path, seq: int, size: int) -> None:
    raw = json.loads(str(_rows(path, "SELECT value FROM meta WHERE key = 'cut'")[0][0]))
    raw["kept"][str(seq)]["size"] = size
    _set(path, "UPDATE meta SET value = ? WHERE key = 'cut'", json.dumps(raw))


def test_a_kept_record_below_the_cut_has_its_mac_checked(node: Callable[..., Node]) -> None:
    n = _pruned(node, hmac=True)
    seq = _kept_policy(n.path)
    _set(n.path, "UPDATE per SET mac = zeroblob(32) WHERE seq = ?", seq)
    report = verify_ledger(n.path, n.hmac)
    assert (report.ok, report.first_bad_seq) == (False, seq), report
    assert report.reason.startswith("MAC does not verify with the epoch "), report


@pytest.mark.parametrize("size", [0, 100, CUT + 256])
def test_a_proof_at_a_size_that_is_no_cut_is_named(node: Callable[..., Node],
                                                   size: int) -> None:
    """The genesis proven at tree size 0 (not past itself), at a size off the grain,
    or past the cut."""
    n = _pruned(node, hmac=False)
    _set_proof_size(n.path, 0, size)
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, 0, f"record 0 is proven at tree size {size}, which is no cut"), report


def test_a_kept_record_rewritten_or_deleted_is_named_by_its_seq(
        node: Callable[..., Node]) -> None:
    n = _pruned(node, hmac=False)
    seq = _kept_policy(n.path)
    _edit_kept_body(n.path)
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq) == (False, seq), report
    assert "not in the Merkle tree of its cut" in report.reason
    _set(n.path, "DELETE FROM per WHERE seq = ?", seq)
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq) == (False, seq), report
    assert report.reason == f"record {seq}, kept at the cut at seq {CUT}, is missing"


def test_the_first_record_after_the_cut_missing_is_named(node: Callable[..., Node]) -> None:
    n = _pruned(node, hmac=False)
    _set(n.path, "DELETE FROM per WHERE seq = ?", CUT)
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, CUT, f"record {CUT}, the first after the cut, is missing"), report


def test_a_genesis_relinked_below_the_cut_is_caught(node: Callable[..., Node]) -> None:
    """Record 1 is pruned, so nothing after the genesis checks its hash; its leaf
    (and so its proof) covers the body alone. Only seq 0's rule, that it links to
    the zero hash, is left to catch a new prev hash with a hash to match."""
    n = _pruned(node, hmac=False)
    assert _rows(n.path, "SELECT count(*) FROM per WHERE seq = 1") == [(0,)]
    (body,), = _rows(n.path, "SELECT body FROM per WHERE seq = 0")
    prev = b"\x11" * 32
    _set(n.path, "UPDATE per SET prev_hash = ?, hash = ? WHERE seq = 0", prev,
         hashlib.sha256(prev + bytes(body)).digest())
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq) == (False, 0), report


def test_a_stored_checkpoint_exactly_at_the_cut_is_kept_and_checked(keys: Keys,
                                                                      tmp_path: Path) -> None:
    """Checkpoints before the cut are refused; the one at the cut anchors it."""
    clock = ManualClock()
    path = tmp_path / "at-cut.db"
    with Ledger.open(path, keys.hmac, keys.signing, node="n1", cluster="c1", clock=clock,
                     epoch_seconds=900) as led:
        while led.size < CUT:
            write_records(led, clock, 1, start=led.size)
        assert led.checkpoint().size == CUT
        write_records(led, clock, 100, start=CUT)
        led.checkpoint()
    prune_ledger(path, tmp_path / "a1.seg", align=256, clock=clock, before_seq=800)
    assert _rows(path, "SELECT min(size) FROM checkpoint") == [(CUT,)]
    report = verify_ledger(path, keys.hmac, keys.public)
    assert (report.ok, report.first_seq) == (True, CUT), report
    assert report.checkpoints_checked == 2


def test_a_pruned_ledger_without_checkpoints_is_named(node: Callable[..., Node]) -> None:
    n = _pruned(node, hmac=False)
    _set(n.path, "DELETE FROM checkpoint")
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"no checkpoint covers the cut at seq {CUT}: nothing anchors the records "
                     "pruned before it"), report


def test_a_big_pruned_ledger_is_walked_by_workers_and_judged_the_same(
        tmp_path: Path, keys: Keys) -> None:
    # two chunks of 2^14 records kept after a cut on the chunk grid: sparkctl verify
    # splits the walk over worker processes from the cut, and names a fault the same
    path = tmp_path / "big.db"
    clock = ManualClock()
    with Ledger.open(path, keys.hmac, keys.signing, node="n1", cluster="c1", clock=clock,
                     epoch_seconds=3600) as led:
        batch = [("cap", {"v": 1, "job_id": str(i % 7), "power_mw": i}) for i in range(4096)]
        while led.size < 3 * CHUNK:
            led.append_many(batch)
        led.checkpoint()
        size = led.size
    assert prune_ledger(path, tmp_path / "a.seg", before_seq=CHUNK + 5).cut == CHUNK
    many = workers() >= 2
    good = verify_ledger(path, keys.hmac, keys.public)
    assert (good.ok, good.first_seq, good.count, good.parallel) == (True, CHUNK, size, many), good
    seq = 2 * CHUNK + 11  # in the second chunk after the cut
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE per SET body = replace(body, '\"power_mw\"', '\"power_mW\"') "
                     "WHERE seq = ?", (seq,))
    conn.close()
    bad = verify_ledger(path, keys.hmac, keys.public)
    assert (bad.ok, bad.first_bad_seq, bad.parallel) == (False, seq, many), bad
    assert "hash" in bad.reason, bad.reason


def test_a_stored_checkpoint_from_before_the_cut_is_named(node: Callable[..., Node]) -> None:
    # a prune removes them (what they sign is archived); one put back is refused by id
    n = node()
    size, time_ns, key_id, text = _rows(
        n.path, "SELECT size, time_ns, key_id, text FROM checkpoint WHERE size < ? "
        "ORDER BY size DESC LIMIT 1", CUT)[0]
    _prune(n, "a1.seg", before_seq=800)
    assert not _rows(n.path, "SELECT id FROM checkpoint WHERE size < ?", CUT)
    with sqlite3.connect(n.path) as conn:
        cid = conn.execute("INSERT INTO checkpoint (size, time_ns, key_id, text) VALUES "
                           "(?, ?, ?, ?)", (size, time_ns, key_id, text)).lastrowid
    conn.close()
    report = verify_ledger(n.path, n.hmac)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"stored checkpoint #{cid} (size {size}) is before the cut at seq {CUT}")


@pytest.mark.parametrize(("edit", "why"), [
    ("UPDATE per SET mac = zeroblob(32) WHERE seq = ?", "MAC does not verify with the epoch"),
    # stripped as if written without HMAC: only the ledger's key id says a MAC is due
    ("UPDATE per SET mac = NULL, key_id = NULL WHERE seq = ?", "MAC"),
    ("UPDATE per SET prev_hash = zeroblob(32) WHERE seq = ?", "prev"),
])
def test_a_record_after_the_cut_is_judged_with_the_ledgers_keys_and_link(
        node: Callable[..., Node], edit: str, why: str) -> None:
    """The walk from the cut keeps the keys and the head the rows below it left: the
    first record after the cut links to the kept anchor, and a MAC is due on each."""
    n = _pruned(node, hmac=True)
    for seq in (CUT, CUT + 101):
        edited = n.path.with_name(f"edit-{seq}.db")
        shutil.copy(n.path, edited)
        _set(edited, edit, seq)
        report = verify_ledger(edited, n.hmac)
        assert (report.ok, report.first_bad_seq) == (False, seq), report
        assert why in report.reason, report.reason


def test_a_chain_after_the_cut_that_starts_elsewhere_is_named_by_the_next_checkpoint(
        node: Callable[..., Node]) -> None:
    """Every record from the cut on re-chained from another start: each hash and link
    holds and the bodies (so the Merkle leaves) are the same. The prune kept no hash of
    the record before the cut, so the first checkpoint after it is what names this."""
    n = _pruned(node, hmac=False)
    prev = bytes(32)
    with sqlite3.connect(n.path) as conn:
        for seq, body in conn.execute("SELECT seq, body FROM per WHERE seq >= ? ORDER BY seq",
                                      (CUT,)).fetchall():
            h = hashlib.sha256(prev + bytes(body)).digest()
            conn.execute("UPDATE per SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, seq))
            prev = h
    conn.close()
    cid, size = _rows(n.path, "SELECT id, size FROM checkpoint WHERE size > ? ORDER BY size "
                      "LIMIT 1", CUT)[0]
    report = verify_ledger(n.path)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, size - 1, f"record {size - 1} differs from stored checkpoint #{cid} "
        "(rewritten, forked, or truncated and re-appended)"), report


def test_kept_checkpoints_are_judged_against_the_cut_by_their_place_in_the_list(
        node: Callable[..., Node]) -> None:
    """A kept note from before the cut cannot be checked here (what it signs is in the
    archive): refused naming which one; a note signed exactly at the cut still is."""
    n = node()
    with closing(sqlite3.connect(n.path)) as conn:
        at_cut = sign_checkpoint(n.kept.origin, CUT, root_at(conn, CUT),
                                 bytes(conn.execute("SELECT hash FROM per WHERE seq = ?",
                                                    (CUT - 1,)).fetchone()[0]).hex(),
                                 n.signing)
    early = _rows(n.path, "SELECT text FROM checkpoint WHERE size < ? ORDER BY size DESC "
                  "LIMIT 1", CUT)[0][0]
    _prune(n, "a1.seg", before_seq=800)
    report = verify_ledger(n.path, n.hmac, checkpoints=[n.kept, at_cut])
    assert report.ok and report.checkpoints_checked >= 2, report
    size = parse_checkpoint(early).size
    with pytest.raises(LedgerError) as err:
        verify_ledger(n.path, n.hmac, checkpoints=[n.kept, early])
    assert err.value.message == (f"{n.path}: kept checkpoint 2 (size {size}) is before the "
                                 f"ledger's cut at seq {CUT}: check it against the archive")
