"""The writer: durable appends, the stored bytes, records(), reopening, rotation."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from spark_slurm.canonical import canonical_bytes
from spark_slurm.clock import ManualClock
from spark_slurm.errors import CanonicalError, LedgerError, LedgerKeyError
from spark_slurm.ledger import Ledger, verify_checkpoint, verify_ledger
from spark_slurm.ledger.merkle import leaf_hash, root
from spark_slurm.ledger.records import body_bytes
from tests.unit.ledger.conftest import Keys


def open_plain(path: Path, clock: ManualClock | None = None) -> Ledger:
    return Ledger.open(path, node="n1", cluster="c1", clock=clock or ManualClock())


def test_genesis_names_node_and_keys(tmp_path: Path, keys: Keys) -> None:
    with Ledger.open(tmp_path / "l.db", keys.hmac, keys.signing, node="gpu07",
                     cluster="west") as led:
        genesis = next(led.records())
    assert (genesis.seq, genesis.kind, genesis.prev_hash) == (0, "genesis", "00" * 32)
    body = genesis.body
    assert body["node"] == "gpu07" and body["cluster"] == "west"
    assert body["hmac_key_id"] and body["signing_key_id"]
    assert genesis.key_id == f"{body['hmac_key_id']}:0"


def test_append_returns_receipt_and_hash_covers_prev_and_stored_bytes(tmp_path: Path) -> None:
    clock = ManualClock()
    with open_plain(tmp_path / "l.db", clock) as led:
        receipt = led.append("cap", {"job_id": "42", "granted_mw": 400_000})
        rec = list(led.records())[-1]
    assert receipt.seq == 1 == rec.seq
    assert receipt.hash == rec.hash
    expected_bytes = canonical_bytes({"body": {"job_id": "42", "granted_mw": 400_000},
                                      "job": "42", "kind": "cap", "seq": 1,
                                      "time_ns": clock.now_ns()})
    assert rec.body_bytes == expected_bytes
    assert rec.hash == hashlib.sha256(bytes.fromhex(rec.prev_hash) + expected_bytes).hexdigest()
    assert rec.job_id == "42" and rec.body == {"job_id": "42", "granted_mw": 400_000}


def test_sqlite_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    led = open_plain(tmp_path / "l.db")
    try:
        conn = led._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        led.close()


@pytest.mark.parametrize(("body", "where"), [
    ({"power": 1.5}, "$.power"),
    ({"nested": {"x": float("nan")}}, "$.nested.x"),
    ({1: "a"}, "$"),
    ({"job_id": 42}, "$.job_id"),
    ({"ok": object()}, "$.ok"),
])
def test_bad_bodies_are_refused_and_nothing_is_written(tmp_path: Path, body: dict[object, object],
                                                      where: str) -> None:
    with open_plain(tmp_path / "l.db") as led:
        led.append("cap", {"a": 1})
        before = led.head()
        with pytest.raises(CanonicalError, match=rf"record body at {re.escape(where)}"):
            led.append_many([("cap", {"fine": 1}), ("cap", body)])  # type: ignore[list-item]
        assert led.head() == before
        led.append("cap", {"b": 2})  # the ledger still works after a refusal
    assert verify_ledger(tmp_path / "l.db").ok


@pytest.mark.parametrize("kind", ["", "Cap", "cap power", "x" * 65])
def test_bad_kinds_are_refused(tmp_path: Path, kind: str) -> None:
    with open_plain(tmp_path / "l.db") as led, pytest.raises(CanonicalError, match="kind"):
        led.append(kind, {"a": 1})


def test_append_many_is_one_transaction(tmp_path: Path) -> None:
    with open_plain(tmp_path / "l.db") as led:
        receipts = led.append_many([("cap", {"i": i}) for i in range(50)])
        assert [r.seq for r in receipts] == list(range(1, 51))
        assert led.head() == receipts[-1]
        assert led.append_many([]) == []


def test_records_filters_by_job_kind_and_since(tmp_path: Path) -> None:
    with open_plain(tmp_path / "l.db") as led:
        for i in range(2500):  # more than one read chunk
            led.append_many([("cap" if i % 2 else "restore", {"job_id": str(i % 5), "i": i})])
        job3 = list(led.records(job_id="3"))
        assert len(job3) == 500 and all(r.job_id == "3" for r in job3)
        assert [r.seq for r in job3] == sorted(r.seq for r in job3)
        caps = list(led.records(kinds=["cap"], since=2000))
        assert all(r.kind == "cap" and r.seq >= 2000 for r in caps) and len(caps) == 251
        assert list(led.records(kinds=[])) == []
        assert len(list(led.records())) == 2501
        # newest first: the same records, reversed, across read chunks and kind filters
        assert list(led.records_newest_first()) == list(led.records())[::-1]
        assert list(led.records_newest_first(kinds=["cap"])) == \
            list(led.records(kinds=["cap"]))[::-1]
        assert list(led.records_newest_first(kinds=[])) == []


def test_reopen_continues_the_chain_and_the_tree(tmp_path: Path) -> None:
    clock = ManualClock()
    with open_plain(tmp_path / "l.db", clock) as led:
        led.append("cap", {"a": 1})
    with open_plain(tmp_path / "l.db", clock) as led:
        r = led.append("cap", {"a": 2})
        assert r.seq == 2
        leaves = led.leaf_hashes()
        assert len(leaves) == 3 == led.size
        assert led._chain.root() == root([leaf_hash(x.body_bytes) for x in led.records()])
    assert verify_ledger(tmp_path / "l.db").ok


def test_reopen_for_another_node_is_refused(tmp_path: Path) -> None:
    open_plain(tmp_path / "l.db").close()
    with pytest.raises(LedgerError, match="belongs to node 'n1', not 'n2'"):
        Ledger.open(tmp_path / "l.db", node="n2", cluster="c1")


def test_opening_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    (tmp_path / "text.db").write_text("hello, not a database\n")
    with pytest.raises(LedgerError, match="not an SQLite database"):
        Ledger.open(tmp_path / "text.db")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(LedgerError, match="without a meta table"):
        Ledger.open(tmp_path / "other.db")


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    open_plain(tmp_path / "l.db").close()
    conn = sqlite3.connect(tmp_path / "l.db")
    conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="unknown ledger schema version '9'"):
        open_plain(tmp_path / "l.db")


def test_wrong_keys_on_reopen_are_refused(tmp_path: Path, keys: Keys) -> None:
    Ledger.open(tmp_path / "l.db", keys.hmac, keys.signing, node="n1").close()
    with pytest.raises(LedgerKeyError, match=r"HMAC key .* is not this ledger's key"):
        Ledger.open(tmp_path / "l.db", bytes(32), node="n1")
    with pytest.raises(LedgerKeyError, match=r"signing key .* is not the ledger's current key"):
        Ledger.open(tmp_path / "l.db", signing_key=Ed25519PrivateKey.generate(), node="n1")
    # Reopening without K[0] continues from the evolved key kept in the ledger.
    with Ledger.open(tmp_path / "l.db", node="n1") as led:
        led.append("cap", {"a": 1})
    assert verify_ledger(tmp_path / "l.db", keys.hmac, keys.public).ok


def test_closed_ledger_refuses_use(tmp_path: Path) -> None:
    led = open_plain(tmp_path / "l.db")
    led.close()
    led.close()  # idempotent
    with pytest.raises(LedgerError, match="closed"):
        led.append("cap", {})


def test_checkpoint_needs_a_signing_key(tmp_path: Path) -> None:
    with open_plain(tmp_path / "l.db") as led, pytest.raises(LedgerKeyError, match="signing"):
        led.checkpoint()


def test_periodic_and_shutdown_checkpoints(tmp_path: Path, keys: Keys) -> None:
    clock = ManualClock()
    led = Ledger.open(tmp_path / "l.db", signing_key=keys.signing, node="n1", clock=clock,
                      checkpoint_interval_s=900)
    first = len(led.checkpoints())  # one at open
    led.append("cap", {"a": 1})
    clock.advance(899)
    led.maintain()
    assert len(led.checkpoints()) == first
    clock.advance(2)
    led.maintain()
    assert len(led.checkpoints()) == first + 1
    led.maintain()  # nothing new: no duplicate checkpoint
    assert len(led.checkpoints()) == first + 1
    led.append("cap", {"a": 2})
    led.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    sizes = [s for (s,) in conn.execute("SELECT size FROM checkpoint ORDER BY id")]
    conn.close()
    assert sizes[-1] == 3  # the shutdown checkpoint covers everything


def test_rotation_is_a_record_and_later_checkpoints_use_the_new_key(tmp_path: Path,
                                                                    keys: Keys) -> None:
    new = Ed25519PrivateKey.generate()
    with Ledger.open(tmp_path / "l.db", signing_key=keys.signing, node="n1") as led:
        led.append("cap", {"a": 1})
        r = led.rotate_signing_key(new)
        cp = led.checkpoint()
    rec = next(x for x in Ledger.open(tmp_path / "l.db", node="n1").records(since=r.seq))
    assert rec.kind == "key" and rec.body["event"] == "rotate"
    verify_checkpoint(cp.text, new.public_key())
    report = verify_ledger(tmp_path / "l.db", public_key=keys.public, checkpoints=[cp])
    assert report.ok, report.reason
    assert len(report.signing_keys) == 2
    with pytest.raises(LedgerKeyError, match="current key"):
        Ledger.open(tmp_path / "l.db", signing_key=keys.signing, node="n1")


def test_readers_on_other_threads_while_the_writer_appends(tmp_path: Path) -> None:
    led = open_plain(tmp_path / "l.db")
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(30):
                seqs = [r.seq for r in led.records()]
                assert seqs == list(range(len(seqs)))
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(200):
        led.append("cap", {"i": i})
    for t in readers:
        t.join()
    led.close()
    assert errors == []
    assert verify_ledger(tmp_path / "l.db").count == 201


def test_body_with_unicode_round_trips(tmp_path: Path) -> None:
    body = {"reason": "température > 85 °C", "job_id": "7_1"}
    with open_plain(tmp_path / "l.db") as led:
        led.append("throttle", body)
        rec = next(iter(led.records(job_id="7_1")))
    assert rec.body == body
    assert json.loads(rec.body_bytes)["kind"] == "throttle"
    assert verify_ledger(tmp_path / "l.db").ok


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(max_size=8), _values, max_size=6))
def test_fast_encoding_is_exactly_canonical_or_refused_alike(body: dict[str, object]) -> None:
    try:
        expected: bytes | None = canonical_bytes(body)
    except (CanonicalError, UnicodeEncodeError):
        expected = None
    try:
        got: bytes | None = body_bytes(body)
    except CanonicalError:
        got = None
    assert got == expected
