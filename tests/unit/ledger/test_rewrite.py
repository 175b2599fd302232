"""An attacker without keys rewrites a record and everything derived from it.

On a ledger without HMAC nothing secret stops someone with write access from
editing record 2's body, recomputing its hash, the saved Merkle frontier and the
stored subtrees. What still catches it: record 3's link to the old hash, and,
when they also re-link every later record, the signed checkpoints. Both verifiers
must name the right seq. The attacker (`tamper.rewrite_derived`) is written with
hashlib alone (not with the library's Chain), so the test does not share code
with what it tests; tests/unit/head/test_rewrite_derived.py takes the same
rewrite through the parallel walk, merge and the witness.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Checkpoint, Ledger, export_checkpoint, verify_ledger
from tests.unit.head.tamper import rewrite_derived as rewrite
from tests.unit.ledger.conftest import needs_shell_tools, shell_verify

N = 300  # more than 2^8 records: the stored subtrees are part of what is rewritten


def _write(path: Path, signing: Ed25519PrivateKey | None) -> list[Checkpoint]:
    """An unkeyed ledger (no HMAC) of N records; with a signing key, checkpoints
    at 100 and at the end (the first one is what an auditor kept)."""
    clock = ManualClock()
    kept = []
    with Ledger.open(path, None, signing, node="n1", cluster="c1", clock=clock) as led:
        for i in range(1, N):
            led.append("cap", {"v": 1, "node": "n1", "job_id": str(i % 5), "power_mw": 1000 + i})
            clock.advance(1)
            if signing is not None and led.size == 100:
                kept.append(led.checkpoint())
    return kept


def test_a_rewritten_record_fails_at_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    _write(path, None)
    assert verify_ledger(path).ok
    rewrite(path, 2, relink=False)
    report = verify_ledger(path)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, 3, "prev hash does not match the hash of seq 2")


def test_a_prev_hash_column_edited_alone_is_caught(tmp_path: Path) -> None:
    """The hash of record 3 still covers the true link; only its prev column lies."""
    path = tmp_path / "node.db"
    _write(path, None)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE per SET prev_hash = zeroblob(32) WHERE seq = 3")
    conn.commit()
    conn.close()
    report = verify_ledger(path)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, 3, "prev hash does not match the hash of seq 2")


def test_a_relinked_rewrite_fails_at_the_stored_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    _write(path, Ed25519PrivateKey.generate())
    rewrite(path, 2, relink=True)
    report = verify_ledger(path)
    assert (report.ok, report.first_bad_seq) == (False, 99)
    assert report.reason.startswith("record 99 differs from stored checkpoint #2")  # #1: at open


def test_a_relinked_rewrite_with_checkpoints_dropped_fails_at_the_kept_one(
        tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    kept = _write(path, Ed25519PrivateKey.generate())
    rewrite(path, 2, relink=True, drop_checkpoints=True)
    assert verify_ledger(path).ok  # self-consistent: without a kept checkpoint, undetectable
    report = verify_ledger(path, checkpoints=kept)
    assert (report.ok, report.first_bad_seq) == (False, 99)
    assert report.reason.startswith("record 99 differs from kept checkpoint 1 (size 100)")


@needs_shell_tools
@pytest.mark.parametrize("relink", [False, True])
def test_the_shell_verifier_names_the_same_seq(tmp_path: Path, relink: bool) -> None:
    path = tmp_path / "node.db"
    kept = _write(path, Ed25519PrivateKey.generate() if relink else None)
    rewrite(path, 2, relink=relink, drop_checkpoints=relink)
    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)
    args = ["--checkpoint", str(export_checkpoint(kept[0], tmp_path / "kept.cp"))] \
        if relink else []
    code, text = shell_verify(copy, *args)
    expected = verify_ledger(path, checkpoints=kept)
    assert not expected.ok
    assert code == 1 and f"first bad seq {expected.first_bad_seq}: " in text, text
