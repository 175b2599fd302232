"""Keys under `verify_ledger`: a seal must seal the current epoch under the node's
HMAC key id, a signing-key rotation needs a signing key to rotate from and strict
base64 in what it carries, and a ledger written without HMAC holds no MAC or key id.

Each forgery is written as an attacker holding K[0] (but no signing key) would:
the one body edited, every later record rechained and re-MACed, the saved
frontier and subtrees rebuilt, the checkpoints dropped. The key record is then the
only thing wrong, and the verdict has to name it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.ledger import VerifyReport, hmac_epochs, verify_ledger
from tests.unit.head import tamper
from tests.unit.ledger.conftest import Built, Keys, resign, small_ledger

Edit = Callable[[dict[str, Any]], None]


def _key_rows(rows: list[list[Any]], event: str) -> list[int]:
    return [i for i, r in enumerate(rows)
            if r[2] == "key" and json.loads(r[4])["body"].get("event") == event]


def _forged(built: Built, tmp_path: Path, event: str, edit: Edit) -> tuple[Path, int]:
    """A copy of the built ledger whose first `event` key record is edited."""
    path = tmp_path / f"{event}.db"
    shutil.copy(built.path, path)
    rows = tamper.rows(path)
    at = _key_rows(rows, event)[0]
    envelope = json.loads(rows[at][4])
    edit(envelope["body"])
    rows[at][4] = json.dumps(envelope).encode()
    tamper.rewrite(path, rows, built.keys.hmac, tree=True)
    return path, at


def _verify(path: Path, built: Built) -> VerifyReport:
    return verify_ledger(path, built.keys.hmac, built.keys.public)


def _spoil(field: str) -> Edit:
    """Put a character outside the base64 alphabet in the middle of `field`: a
    lenient decoder skips it and gets the same bytes back."""
    def edit(body: dict[str, Any]) -> None:
        text = body[field]
        body[field] = text[:8] + "*" + text[8:]
    return edit


@pytest.fixture
def built(build: Callable[..., Built]) -> Built:
    return build(40)


def test_the_forger_leaves_an_untouched_key_record_verifying(built: Built,
                                                             tmp_path: Path) -> None:
    """The control for every case below: rewriting with no edit is not caught."""
    for event in ("seal", "rotate"):
        path, _ = _forged(built, tmp_path, event, lambda body: None)
        report = _verify(path, built)
        assert report.ok, report


@pytest.mark.parametrize(("name", "edit"), [
    ("another epoch", lambda body: body.update(epoch=body["epoch"] + 1)),
    ("another key id", lambda body: body.update(key_id="0" * len(body["key_id"]))),
])
def test_a_seal_of_another_epoch_or_key_is_named(built: Built, tmp_path: Path, name: str,
                                                 edit: Edit) -> None:
    rows = tamper.rows(built.path)
    epoch = json.loads(rows[_key_rows(rows, "seal")[0]][4])["body"]["epoch"]
    path, at = _forged(built, tmp_path, "seal", edit)
    report = _verify(path, built)
    assert not report.ok, name
    assert report.first_bad_seq == at, report
    assert report.reason == f"seal record does not seal the current epoch {epoch}", report


def test_a_rotation_naming_another_key_id_is_named(built: Built, tmp_path: Path) -> None:
    path, at = _forged(built, tmp_path, "rotate", lambda body: body.update(key_id="0" * 16))
    report = _verify(path, built)
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, at, "key rotation names a key id that is not its public key's"), report


@pytest.mark.parametrize("field", ["public_key", "endorsement"])
def test_a_rotation_in_lenient_base64_is_refused(built: Built, tmp_path: Path,
                                                 field: str) -> None:
    path, at = _forged(built, tmp_path, "rotate", _spoil(field))
    report = _verify(path, built)
    assert not report.ok, field
    assert report.first_bad_seq == at, report
    assert report.reason == "key rotation is not endorsed by the outgoing signing key", report


def test_a_rotation_in_a_ledger_without_a_signing_key_is_named(keys: Keys,
                                                               tmp_path: Path) -> None:
    """A forged rotate record, copied from a signed ledger into one written without a
    signing key (nothing to endorse it with)."""
    path = small_ledger(tmp_path / "unsigned.db", keys.hmac, None)
    rows = tamper.rows(path)
    rotation = {"v": 1, "node": "n1", "event": "rotate", "public_key": "AAAA",
                "endorsement": "AAAA", "key_id": "0" * 16}
    at = 3
    rows[at][2] = "key"
    rows[at][3] = None
    rows[at][4] = json.dumps({"body": rotation}).encode()
    tamper.rewrite(path, rows, keys.hmac, tree=True)
    report = verify_ledger(path, keys.hmac)
    assert not report.ok
    assert report.first_bad_seq == at, report
    assert report.reason == "key rotation in a ledger that has no signing key", report


@pytest.mark.parametrize(("column", "value"), [("mac", bytes(32)), ("key_id", "0" * 16 + ":0")])
def test_a_mac_or_key_id_in_a_ledger_without_hmac_is_named(build: Callable[..., Built],
                                                           tmp_path: Path, column: str,
                                                           value: object) -> None:
    """Either column alone: the MAC is not hashed, so nothing else changes."""
    built = build(40, hmac=False)
    path = tmp_path / "plain.db"
    shutil.copy(built.path, path)
    tamper.sql(path, f"UPDATE per SET {column} = ? WHERE seq = 7", (value,))
    report = verify_ledger(path, None, built.keys.public)
    assert not report.ok, column
    assert report.first_bad_seq == 7, report
    assert report.reason == "record carries a MAC in a ledger created without HMAC", report


def _set_mac(path: Path, seq: int, key: Keys, epoch: int, *, key_id: object = None,
             mac: bytes | None = b"") -> None:
    """Give record `seq` the key id and MAC of another epoch (or the ones given). The
    MAC is not hashed, so the chain, tree and checkpoints stay as they were."""
    with sqlite3.connect(path) as conn:
        (value, h), = conn.execute("SELECT key_id, hash FROM per WHERE seq = ?", (seq,))
        hid = str(value).partition(":")[0]
        if mac == b"":
            mac = hmac_epochs.mac(hmac_epochs.EpochKeys(key.hmac).key(epoch), bytes(h))
        conn.execute("UPDATE per SET key_id = ?, mac = ? WHERE seq = ?",
                     (key_id if key_id is not None else hmac_epochs.key_id(hid, epoch), mac,
                      seq))
    conn.close()


@pytest.mark.parametrize(("seq", "epoch", "why"), [
    (0, 1, "genesis record is not in epoch 0"),
    (9, 1, "record in epoch 1 follows epoch 0 which was not sealed"),
    (9, 2, "record in epoch 2 follows epoch 0"),
    (11, 0, "record in epoch 0 after that epoch was sealed"),
])
def test_a_record_moved_to_another_epoch_is_named(built: Built, tmp_path: Path, seq: int,
                                                  epoch: int, why: str) -> None:
    """built(40): epoch 0 is sealed by record 10, epoch 1 starts at record 11. Each
    record's MAC is right for the epoch its key id names."""
    path = tmp_path / "epochs.db"
    shutil.copy(built.path, path)
    _set_mac(path, seq, built.keys, epoch)
    report = _verify(path, built)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, seq, why), report


@pytest.mark.parametrize(("name", "change", "why"), [
    ("no MAC", {"mac": None}, "record has no MAC or a malformed key id"),
    ("another HMAC key", {"key_id": "0" * 16 + ":0"}, "record has no MAC or a malformed key id"),
    ("a key id that is not text", {"key_id": 7}, "record has no MAC or a malformed key id"),
    ("a wrong MAC", {"mac": bytes(32)}, "MAC does not verify with the epoch 0 key"),
])
def test_a_seal_with_a_bad_mac_or_key_id_is_named(built: Built, tmp_path: Path, name: str,
                                                  change: dict[str, Any], why: str) -> None:
    """The seal (record 10) takes the careful path; its MAC is checked there."""
    path = tmp_path / "seal-mac.db"
    shutil.copy(built.path, path)
    _set_mac(path, 10, built.keys, 0, **change)
    report = _verify(path, built)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, 10, why), name


def test_a_kept_checkpoint_for_a_ledger_without_a_signing_key_is_refused(
        built: Built, keys: Keys, tmp_path: Path) -> None:
    """Nothing to check its signature with: refused, whoever signed it."""
    path = small_ledger(tmp_path / "unsigned.db", keys.hmac, None)
    cp = built.kept[0]
    report = verify_ledger(path, keys.hmac, checkpoints=[cp])
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"kept checkpoint 1 (size {cp.size}): ledger has no signing key to "
                     "check it with"), report


def test_a_kept_checkpoint_naming_another_origin_is_refused(built: Built) -> None:
    """Signed by the node's own (rotated) key over its own tree, but for another origin:
    a note for one node is no proof for another."""
    cp = built.kept[0]
    ledger = verify_ledger(built.path, built.keys.hmac, built.keys.public, [cp])
    assert ledger.ok, ledger
    other = resign(built, origin="c1/n2")
    report = verify_ledger(built.path, built.keys.hmac, built.keys.public, [other])
    assert (report.ok, report.first_bad_seq, report.reason) == (
        False, None, f"kept checkpoint 1 (size {cp.size}): checkpoint origin 'c1/n2' is not "
                     f"{cp.origin!r}"), report
