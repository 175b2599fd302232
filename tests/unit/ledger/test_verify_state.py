"""Records that verify, with saved state or a kept checkpoint that does not agree
with them: `verify_ledger` names each with its exact reason, and with the seq where
there is one. sparkd resumes from the saved state and auditors act on the reason,
so a vaguer or misplaced verdict is a wrong one."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger, verify_ledger
from tests.unit.head import tamper
from tests.unit.ledger.conftest import Built, Keys, damaged, resign, write_records

N = 300  # enough records for one stored 256-leaf subtree; the last epoch is not sealed


@pytest.fixture
def built(build: Callable[..., Built]) -> Built:
    b = build(N)
    rows = tamper.rows(b.path)
    assert rows[-1][2] != "key", "the fixture's last epoch was expected to be open"
    return b


def _epoch(built: Built) -> int:
    return int(str(tamper.rows(built.path)[-1][8]).rsplit(":", 1)[1])


FRONTIER = "saved Merkle frontier does not match the records"
NO_EPOCH = "saved HMAC epoch is missing or malformed"
SUBTREES = "stored Merkle subtrees do not match the records"


@pytest.mark.parametrize(("statement", "why"), [
    ("UPDATE state SET value = zeroblob(96) WHERE key = 'frontier'", FRONTIER),
    ("UPDATE state SET value = 'text' WHERE key = 'frontier'", FRONTIER),  # was a TypeError
    ("DELETE FROM state WHERE key = 'hmac_epoch'", NO_EPOCH),
    ("UPDATE state SET value = CAST('x' AS BLOB) WHERE key = 'hmac_epoch'", NO_EPOCH),
    ("DELETE FROM tree", SUBTREES),
    ("UPDATE tree SET hash = zeroblob(32)", SUBTREES),
    ("UPDATE tree SET level = 'x'", SUBTREES),
    ("UPDATE tree SET idx = 'x'", SUBTREES),
    ("UPDATE tree SET hash = 'not a blob'", SUBTREES),
])
def test_saved_state_that_disagrees_is_named(built: Built, tmp_path: Path, statement: str,
                                             why: str) -> None:
    assert verify_ledger(built.path, built.keys.hmac, built.keys.public).ok
    _, report = damaged(built, tmp_path, statement)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, None, why), statement


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_saved_epoch_past_an_open_epoch_is_named(built: Built, tmp_path: Path,
                                                   ahead: int) -> None:
    """Only a sealed epoch lets the writer's saved epoch be one ahead of the records."""
    epoch = _epoch(built)
    _, report = damaged(built, tmp_path, "UPDATE state SET value = CAST(? AS BLOB) WHERE"
                      " key = 'hmac_epoch'", str(epoch + ahead))
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"saved HMAC epoch {epoch + ahead} does not follow the records' "
                     f"epoch {epoch}"), report


def test_a_saved_epoch_stored_as_text_still_verifies(built: Built, tmp_path: Path) -> None:
    """The same number as text (a hand edit, an older writer) is the same epoch."""
    _, report = damaged(built, tmp_path, "UPDATE state SET value = CAST(value AS TEXT) WHERE"
                      " key = 'hmac_epoch'")
    assert report.ok, report


def test_a_saved_key_of_another_epoch_is_named(built: Built, tmp_path: Path) -> None:
    _, report = damaged(built, tmp_path, "UPDATE state SET value = zeroblob(32) WHERE"
                      " key = 'hmac_key'")
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"saved HMAC key is not the epoch {_epoch(built)} key"), report


def test_a_kept_checkpoint_that_differs_from_the_records_is_named(built: Built) -> None:
    """Signed by the node's key, but with another head or another root: the verdict
    names the checkpoint's last record."""
    size = built.kept[0].size
    label = f"kept checkpoint 1 (size {size})"
    cases = {
        f"record {size - 1} differs from {label} (rewritten, forked, or truncated and "
        "re-appended)": resign(built, head="00" * 32),
        f"Merkle root at size {size} differs from {label}": resign(built, root=bytes(32)),
    }
    for why, cp in cases.items():
        report = verify_ledger(built.path, built.keys.hmac, built.keys.public, [cp])
        assert (report.ok, report.first_bad_seq, report.reason) == (False, size - 1, why)


def test_a_kept_checkpoint_of_no_records_is_named(built: Built) -> None:
    cp = resign(built, size=0)
    report = verify_ledger(built.path, built.keys.hmac, built.keys.public, [cp])
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, "kept checkpoint 1 (size 0): covers no records"), report


def _first_checkpoint_id(built: Built) -> int:
    with sqlite3.connect(built.path) as conn:
        (cid,), = conn.execute("SELECT min(id) FROM checkpoint")
    conn.close()
    return int(cid)


COLUMNS = "its size/time/key id columns do not match its signed note"


@pytest.mark.parametrize("change", [
    "size = size + 1", "time_ns = 'noon'", "key_id = '0000000000000000'"])
def test_a_stored_checkpoint_whose_columns_lie_is_named(built: Built, tmp_path: Path,
                                                        change: str) -> None:
    """Readers pick checkpoints by these columns, so each must match the signed note."""
    cid = _first_checkpoint_id(built)
    _, report = damaged(built, tmp_path, f"UPDATE checkpoint SET {change} WHERE id = ?", cid)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"stored checkpoint #{cid}: {COLUMNS}"), change


def test_an_unreadable_stored_checkpoint_is_named(built: Built, tmp_path: Path) -> None:
    cid = _first_checkpoint_id(built)
    _, report = damaged(built, tmp_path, "UPDATE checkpoint SET text = 'junk' WHERE id = ?", cid)
    assert (report.ok, report.first_bad_seq) == (False, None), report
    assert report.reason.startswith(f"stored checkpoint #{cid}: "), report
    assert report.reason != f"stored checkpoint #{cid}: ", report


def _with_journal(keys: Keys, tmp_path: Path) -> tuple[Path, int]:
    """A ledger holding journal ingest records; returns it and the newest one's seq."""
    clock = ManualClock()
    path = tmp_path / "ingest.db"
    with Ledger.open(path, keys.hmac, keys.signing, node="n1", cluster="c1", clock=clock,
                     epoch_seconds=3600) as led:
        for i in range(3):
            write_records(led, clock, 2, start=2 * i)
            newest = led.append("oob", {"v": 1, "node": "n1", "source": "journal",
                                        "gpu": 0, "cursor": f"c{i}"})
        write_records(led, clock, 2, start=6)
    return path, newest.seq


def test_the_saved_newest_ingest_record_is_checked(keys: Keys, tmp_path: Path) -> None:
    """sparkd resumes journal ingestion from `state.latest.journal`: it must name the
    newest journal record (as bytes, or as text a hand or an older writer left)."""
    path, newest = _with_journal(keys, tmp_path)
    assert verify_ledger(path, keys.hmac).ok
    cases = [
        ("UPDATE state SET value = ? WHERE key = 'latest.journal'", str(newest), ""),
        ("UPDATE state SET value = CAST(? AS BLOB) WHERE key = 'latest.journal'",
         str(newest - 3), "saved newest journal record does not match the records"),
        ("INSERT INTO state VALUES ('latest.bogus', CAST('1' AS BLOB))", None,
         "unknown saved state 'latest.bogus'"),
    ]
    for statement, value, why in cases:
        copy = tmp_path / "case.db"
        shutil.copy(path, copy)
        tamper.sql(copy, statement, () if value is None else (value,))
        report = verify_ledger(copy, keys.hmac)
        assert (report.ok, report.reason) == (not why, why), statement
