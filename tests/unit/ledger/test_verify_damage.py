"""Damage `verify_ledger` reports as a failed check with a whole report, not as a
crash: tables SQLite cannot decode, an edited cut row, an extra table, a
checkpoint stored for another origin, a public key that is not the ledger's and an
index out of step with its table; and every field of a good and a failed report."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.errors import LedgerKeyError
from spark_slurm.ledger import VerifyReport, verify_ledger
from spark_slurm.ledger.keys import signing_key_id
from tests.unit.ledger.conftest import Built, Keys, damaged, resign, small_ledger


@pytest.fixture
def built(build: Callable[..., Built]) -> Built:
    return build(40)


def test_a_checkpoint_table_sqlite_cannot_read_is_a_failed_check(built: Built,
                                                                    tmp_path: Path) -> None:
    _, report = damaged(built, tmp_path, "DROP TABLE checkpoint")
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, "SQLite cannot read the checkpoints: no such table: checkpoint"), report


def test_a_column_that_is_not_utf8_is_read_as_the_verifier_reads_it(
        built: Built, tmp_path: Path) -> None:
    """Invalid UTF-8 reads as U+FFFD, so the job column no longer matches the hashed
    envelope: a failed check at that seq, not a decode error."""
    _, report = damaged(built, tmp_path,
                         "UPDATE per SET job_id = CAST(X'FF00' AS TEXT) WHERE seq = 3")
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, 3, "seq/time/kind/job columns do not match the hashed bytes"), report


def test_a_state_table_sqlite_cannot_read_is_a_failed_check(built: Built,
                                                             tmp_path: Path) -> None:
    _, report = damaged(built, tmp_path, "DROP TABLE state")
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, "SQLite cannot read the file: no such table: state"), report


def test_an_edited_cut_row_is_a_whole_failed_report(built: Built, tmp_path: Path) -> None:
    path, report = damaged(built, tmp_path, "INSERT INTO meta VALUES ('cut', '{\"seq\": 7}')")
    assert (report.path, report.ok, report.count, report.head, report.node) == (
        str(path), False, 0, None, "n1"), report
    assert report.reason.startswith("the ledger's cut (meta row 'cut') is malformed: "), report


def test_a_table_the_schema_does_not_have_is_named(built: Built, tmp_path: Path) -> None:
    _, report = damaged(built, tmp_path, "CREATE TABLE extra (x)")
    assert (report.ok, report.first_bad_seq) == (False, None), report
    assert report.reason.startswith("table definitions differ from ledger schema version "), \
        report


def test_a_stored_checkpoint_for_another_origin_is_named(built: Built, tmp_path: Path) -> None:
    """Signed by the node's current key over its own tree, stored in its own table,
    but naming another node: refused as the kept one would be."""
    cp = built.kept[0]
    other = resign(built, origin="spark/c1/n2")
    assert built.rotated is not None
    path = tmp_path / "foreign.db"
    shutil.copy(built.path, path)
    with sqlite3.connect(path) as conn:
        cid = conn.execute("INSERT INTO checkpoint (size, time_ns, key_id, text) VALUES"
                           " (?, 0, ?, ?)", (cp.size, signing_key_id(built.rotated.public_key()),
                                             other.text)).lastrowid
    conn.close()
    report = verify_ledger(path, built.keys.hmac, built.keys.public)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"stored checkpoint #{cid}: checkpoint origin 'spark/c1/n2' is not "
                     f"{cp.origin!r}"), report


def test_a_public_key_not_of_this_ledger_is_refused_naming_its_keys(
        built: Built, keys: Keys, tmp_path: Path) -> None:
    outsider = Ed25519PrivateKey.generate().public_key()
    ids = verify_ledger(built.path).signing_keys
    assert len(ids) == 2  # the genesis key and the one rotated to
    with pytest.raises(LedgerKeyError) as err:
        verify_ledger(built.path, built.keys.hmac, outsider)
    assert err.value.message == (f"{built.path}: public key {signing_key_id(outsider)} is not"
                                 f" a signing key of this ledger ({', '.join(ids)})")
    unsigned = small_ledger(tmp_path / "unsigned.db", None, None, 3)
    with pytest.raises(LedgerKeyError) as err:
        verify_ledger(unsigned, None, outsider)
    assert err.value.message.endswith("is not a signing key of this ledger (none)")


def _stored(path: Path, sql: str) -> Any:
    with sqlite3.connect(path) as conn:
        value = conn.execute(sql).fetchone()[0]
    conn.close()
    return value


def test_a_good_ledger_is_reported_whole(built: Built) -> None:
    """Every field `sparkctl verify --json` prints, from the file itself."""
    report = verify_ledger(built.path, built.keys.hmac, built.keys.public,
                           checkpoints=built.kept)
    stored = _stored(built.path, "SELECT COUNT(*) FROM checkpoint")
    head = _stored(built.path, "SELECT hex(hash) FROM per ORDER BY seq DESC LIMIT 1").lower()
    assert stored >= 1
    assert report == VerifyReport(
        path=str(built.path), ok=True, count=_stored(built.path, "SELECT COUNT(*) FROM per"),
        head=head, first_bad_seq=None, reason="", node="n1", hmac_checked=True,
        checkpoints_checked=stored + len(built.kept),
        signing_keys=verify_ledger(built.path).signing_keys, first_seq=0, parallel=False)
    assert len(report.signing_keys) == 2


def test_a_failed_ledger_claims_nothing_it_did_not_check(built: Built, tmp_path: Path) -> None:
    """A failed verify reports no head, no HMAC and no checkpoints as checked."""
    _, report = damaged(built, tmp_path, "UPDATE per SET hash = zeroblob(32) WHERE seq = 5")
    assert (report.ok, report.count, report.head, report.first_bad_seq, report.hmac_checked,
            report.checkpoints_checked, report.first_seq, report.parallel) == (
        False, 0, None, 5, False, 0, 0, False), report
    # a check after the walk fails: the walk's count and head are known, nothing else
    _, late = damaged(built, tmp_path, "CREATE TABLE extra (x)")
    assert (late.ok, late.count, late.hmac_checked, late.checkpoints_checked, late.node) == (
        False, verify_ledger(built.path).count, False, 0, "n1"), late
    assert late.head == verify_ledger(built.path).head


def test_an_index_out_of_step_with_its_table_fails_the_integrity_check(
        built: Built, tmp_path: Path) -> None:
    """Rows, hashes and schema text all intact, but the job index (what `sparkctl
    audit` reads by) lost its entries: only SQLite's integrity check sees it."""
    path = tmp_path / "index.db"
    shutil.copy(built.path, path)
    original = _stored(path, "SELECT sql FROM sqlite_master WHERE name = 'per_job'")
    for statements in (["PRAGMA writable_schema = ON",
                        "UPDATE sqlite_master SET sql = replace(sql, 'WHERE job_id IS NOT "
                        "NULL', 'WHERE 0') WHERE name = 'per_job'"],
                       ["REINDEX per_job"],  # rebuilt empty under the edited definition
                       ["PRAGMA writable_schema = ON",
                        f"UPDATE sqlite_master SET sql = '{original}' WHERE name = 'per_job'"]):
        conn = sqlite3.connect(path, isolation_level=None)
        for statement in statements:
            conn.execute(statement)
        conn.close()
    first = _stored(path, "PRAGMA integrity_check")
    assert first.endswith("missing from index per_job"), first
    report = verify_ledger(path, built.keys.hmac, built.keys.public)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"SQLite integrity check failed: {first}"), report


def test_a_records_table_sqlite_cannot_read_is_a_failed_check_at_the_first_record(
        tmp_path: Path, keys: Keys) -> None:
    """The meta table reads, the records' b-tree root page is garbage: the walk names
    the first record it could not read (a report, not a traceback)."""
    path = small_ledger(tmp_path / "pages.db", keys.hmac, keys.signing, 300)
    with sqlite3.connect(path) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'per'"
                               ).fetchone()
        (page,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with path.open("r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xff" * page)
    report = verify_ledger(path, keys.hmac)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, 0, "SQLite cannot read the record: database disk image is malformed"), report
