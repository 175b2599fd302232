"""The genesis record names the file it opens: format, schema version, node, cluster,
creation time and epoch length, each against the unhashed meta table. A meta row
edited after the fact, or a genesis rewritten (and re-chained) to claim another
format or version, is named at seq 0 with its own reason; the report names no node
until the genesis has been matched to the file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger, VerifyReport, verify_ledger
from tests.unit.head.tamper import rewrite, rows, sql
from tests.unit.ledger.conftest import Built, Keys, small_ledger

FORMAT_REASON = "genesis record does not name this ledger format and schema version"
TIMES_REASON = "genesis created_ns/epoch_seconds differ from the file's meta table"


@pytest.fixture
def built(build: Callable[..., Built]) -> Built:
    return build(20)


def _verdict(report: VerifyReport) -> tuple[object, ...]:
    return (report.ok, report.first_bad_seq, report.reason, report.node, report.count,
            report.head, report.hmac_checked)


def _meta_edited(built: Built, tmp_path: Path, key: str, value: str) -> VerifyReport:
    path = tmp_path / f"meta-{key}.db"
    shutil.copy(built.path, path)
    sql(path, "UPDATE meta SET value = ? WHERE key = ?", (value, key))
    return verify_ledger(path, built.keys.hmac)


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("node", "n9", "genesis node 'n1' differs from the file's meta table"),
    ("cluster", "c9", "genesis cluster 'c1' differs from the file's meta table"),
    ("schema_version", "1", FORMAT_REASON),  # a known version, older than the genesis says
    ("created_ns", "7", TIMES_REASON),
    ("epoch_seconds", "61", TIMES_REASON),  # alone: either one differing is enough
])
def test_a_meta_row_that_disagrees_with_the_genesis_is_named_at_seq_0(
        built: Built, tmp_path: Path, key: str, value: str, reason: str) -> None:
    assert verify_ledger(built.path, built.keys.hmac).ok
    report = _meta_edited(built, tmp_path, key, value)
    assert _verdict(report) == (False, 0, reason, None, 0, None, False), report


def _genesis_rewritten(built: Built, tmp_path: Path, edit: Callable[[dict[str, Any]], None]
                       ) -> VerifyReport:
    path = tmp_path / "genesis.db"
    shutil.copy(built.path, path)
    new = rows(path)
    envelope = json.loads(new[0][4])
    edit(envelope["body"])
    new[0][4] = json.dumps(envelope).encode()
    rewrite(path, new, built.keys.hmac, tree=True)
    return verify_ledger(path, built.keys.hmac)


@pytest.mark.parametrize(("field", "value"), [
    ("format", "spark-slurm-ledger-v0"),
    ("schema_version", 0),  # not a version at all (and not above the meta's)
    ("schema_version", 99),
])
def test_a_genesis_rewritten_to_another_format_or_version_is_named(
        built: Built, tmp_path: Path, field: str, value: object) -> None:
    report = _genesis_rewritten(built, tmp_path, lambda body: body.update({field: value}))
    assert _verdict(report) == (False, 0, FORMAT_REASON, None, 0, None, False), report


def _lenient(body: dict[str, Any]) -> None:
    # a character outside the alphabet, which a lenient decoder skips: the same key
    pub = str(body["signing_public_key"])
    body["signing_public_key"] = pub[:4] + "!" + pub[4:]


# the signing key is judged after the genesis has named its node
@pytest.mark.parametrize(("edit", "reason", "node"), [
    (_lenient, "genesis signing public key is malformed", "n1"),
    (lambda b: b.update(signing_public_key="AAAA"), "genesis signing public key is malformed",
     "n1"),
    (lambda b: b.update(signing_key_id="0123456789abcdef"),
     "genesis signing_key_id does not match its public key", "n1"),
    (lambda b: b.update(hmac_key_id="k0:other"),
     "genesis hmac_key_id differs from the file's meta table", None),
])
def test_a_genesis_whose_keys_do_not_hold_together_is_named(
        built: Built, tmp_path: Path, edit: Callable[[dict[str, Any]], None],
        reason: str, node: str | None) -> None:
    report = _genesis_rewritten(built, tmp_path, edit)
    assert _verdict(report) == (False, 0, reason, node, 0, None, False), report


def test_a_ledger_without_hmac_needs_no_hmac_key_id_row(tmp_path: Path) -> None:
    """An unkeyed ledger's meta may lack the row (nothing to name): it still verifies,
    and a genesis that names an HMAC key against that missing row does not."""
    path = small_ledger(tmp_path / "plain.db", None, None, 4)
    sql(path, "DELETE FROM meta WHERE key = 'hmac_key_id'")
    report = verify_ledger(path)
    assert (report.ok, report.node, report.count) == (True, "n1", 5), report
    new = rows(path)
    envelope = json.loads(new[0][4])
    envelope["body"]["hmac_key_id"] = "k0:x"
    new[0][4] = json.dumps(envelope).encode()
    rewrite(path, new, None)
    assert _verdict(verify_ledger(path)) == (
        False, 0, "genesis hmac_key_id differs from the file's meta table", None, 0, None,
        False)


@pytest.mark.parametrize(("inner", "reason"), [
    (b'[1]', "stored bytes hold no body object"),
    (b'{"x":', "stored bytes are not a JSON envelope"),
])
def test_a_genesis_whose_stored_bytes_are_no_envelope_is_named(
        built: Built, tmp_path: Path, inner: bytes, reason: str) -> None:
    """Hashed and chained as stored, with the envelope's tail (seq, time, kind, job)
    intact, so only parsing the bytes finds it."""
    path = tmp_path / "bytes.db"
    shutil.copy(built.path, path)
    new = rows(path)
    stored = bytes(new[0][4])
    new[0][4] = b'{"body":' + inner + stored[stored.rindex(b',"job":'):]
    rewrite(path, new, built.keys.hmac, tree=True, raw=frozenset({0}))
    report = verify_ledger(path, built.keys.hmac)
    assert _verdict(report) == (False, 0, reason, None, 0, None, False), report


def test_a_ledger_with_no_records_is_missing_record_0(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    shutil.copy(built.path, path)
    sql(path, "DELETE FROM per")
    report = verify_ledger(path, built.keys.hmac)
    assert _verdict(report) == (False, 0, "record 0 is missing", None, 0, None, False), report


def test_a_ledger_of_its_genesis_alone_verifies(tmp_path: Path, keys: Keys) -> None:
    path = small_ledger(tmp_path / "genesis-only.db", keys.hmac, keys.signing, 0)
    report = verify_ledger(path, keys.hmac)
    assert (report.ok, report.count, report.node, report.reason) == (True, 1, "n1", ""), report


@pytest.mark.parametrize(("seq", "kind", "reason"), [
    (0, "cap", "seq 0 is not a genesis record"),
    (5, "genesis", "a second genesis record"),
])
def test_a_genesis_kind_anywhere_but_seq_0_is_named(
        built: Built, tmp_path: Path, seq: int, kind: str, reason: str) -> None:
    """Re-chained with the kind in the hashed envelope, so only the kind rule sees it."""
    path = tmp_path / "kind.db"
    shutil.copy(built.path, path)
    new = rows(path)
    new[seq][2] = kind
    rewrite(path, new, built.keys.hmac, tree=True)
    report = verify_ledger(path, built.keys.hmac)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, seq, reason), report


@pytest.mark.parametrize("event", ["seal", "rotate"])
def test_a_record_body_that_says_event_is_no_key_record(
        tmp_path: Path, keys: Keys, event: str) -> None:
    """Only kind "key" records seal or rotate: a PER whose body happens to carry an
    `event` field is data, also as the first record of an HMAC epoch (its new key id
    sends it down the careful path)."""
    path = tmp_path / "event.db"
    clock = ManualClock()
    with Ledger.open(path, keys.hmac, keys.signing, node="n1", cluster="c1",
                     clock=clock, epoch_seconds=60) as led:
        for _ in range(3):
            led.append("cap", {"v": 1, "node": "n1", "event": event, "key_id": "k",
                               "epoch": 0, "public_key": "AAAA"})
            clock.advance(61)
    report = verify_ledger(path, keys.hmac)
    assert (report.ok, report.reason) == (True, ""), report
    assert _kinds(path).count("key") >= 2  # epochs were sealed in between


def _kinds(path: Path) -> list[str]:
    return [str(r[2]) for r in rows(path)]
