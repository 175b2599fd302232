"""Forward-secure HMAC: epochs sealed even when idle, old keys gone, re-MAC detected."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger import hmac_epochs as he
from spark_slurm.ledger.keys import hmac_key_id
from tests.unit.ledger.conftest import Keys


def test_epoch_keys_evolve_by_hmac_and_verifier_derives_any() -> None:
    k0 = bytes(range(32))
    k1 = he.next_key(k0)
    assert k1 != k0 and len(k1) == 32
    keys = he.EpochKeys(k0)
    assert keys.key(0) == k0 and keys.key(1) == k1 and keys.key(3) == he.next_key(he.next_key(k1))
    assert he.parse_key_id("abc:12") == ("abc", 12)
    for bad in ("abc", "abc:", ":3", "abc:x", "abc:01", "abc:-1"):
        assert he.parse_key_id(bad) is None


def test_idle_epochs_are_sealed_and_the_old_key_is_erased(tmp_path: Path, keys: Keys) -> None:
    clock = ManualClock()
    path = tmp_path / "l.db"
    led = Ledger.open(path, keys.hmac, node="n1", clock=clock, epoch_seconds=60)
    led.append("cap", {"a": 1})
    clock.advance(60 * 3 + 1)
    seals = led.maintain()  # idle: no appends, yet three epochs end
    assert len(seals) == 3
    records = list(led.records(kinds=["key"]))
    assert [(r.body["event"], r.body["epoch"], r.key_id) for r in records] == [
        ("seal", e, f"{hmac_key_id(keys.hmac)}:{e}") for e in range(3)]
    led.close()
    conn = sqlite3.connect(path)
    state = dict(conn.execute("SELECT key, value FROM state").fetchall())
    conn.close()
    assert state["hmac_epoch"] == b"3"
    assert state["hmac_key"] == he.EpochKeys(keys.hmac).key(3)
    raw = path.read_bytes() + (path.with_name("l.db-wal").read_bytes()
                               if path.with_name("l.db-wal").exists() else b"")
    for old in range(3):  # no earlier epoch key is left anywhere in the file
        assert he.EpochKeys(keys.hmac).key(old) not in raw
    report = verify_ledger(path, keys.hmac)
    assert report.ok and report.hmac_checked, report.reason


def test_appending_after_a_long_gap_seals_first(tmp_path: Path, keys: Keys) -> None:
    clock = ManualClock()
    with Ledger.open(tmp_path / "l.db", keys.hmac, node="n1", clock=clock,
                     epoch_seconds=60) as led:
        clock.advance(125)
        r = led.append("cap", {"a": 1})
        assert r.seq == 3  # seals of epochs 0 and 1 come first
        assert next(iter(led.records(since=3))).key_id == f"{hmac_key_id(keys.hmac)}:2"
    assert verify_ledger(tmp_path / "l.db", keys.hmac).ok


def _rewrite_from(path: Path, seq: int, new_body: bytes, key: bytes, epoch: int) -> None:
    """What an attacker holding today's key can do: rewrite a record and every
    later hash, MAC'ing the rewritten records with the key they hold."""
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT seq, body, prev_hash, key_id FROM per WHERE seq >= ? "
                        "ORDER BY seq", (seq,)).fetchall()
    prev = bytes(rows[0][2])
    for s, body, _, key_id in rows:
        data = new_body if s == seq else bytes(body)
        h = hashlib.sha256(prev + data).digest()
        hid = str(key_id).split(":")[0]
        conn.execute("UPDATE per SET body = ?, prev_hash = ?, hash = ?, mac = ?, key_id = ? "
                     "WHERE seq = ?", (data, prev, h, he.mac(key, h), f"{hid}:{epoch}", s))
        prev = h
    conn.commit()
    conn.close()


def test_re_mac_of_old_records_with_a_newer_epoch_key_is_detected(tmp_path: Path,
                                                                   keys: Keys) -> None:
    clock = ManualClock()
    path = tmp_path / "l.db"
    led = Ledger.open(path, keys.hmac, node="n1", clock=clock, epoch_seconds=60)
    led.append("cap", {"job_id": "1", "granted_mw": 300_000})
    clock.advance(61)
    led.append("cap", {"job_id": "2", "granted_mw": 300_000})
    current = led._key
    assert current is not None
    led.close()
    assert verify_ledger(path, keys.hmac).ok
    forged = list(Ledger.open(path, node="n1", clock=clock).records())[1].body_bytes.replace(
        b"300000", b"900000", 1)
    _rewrite_from(path, 1, forged, current, epoch=1)
    for key in (keys.hmac, None):  # with or without K[0], the epoch structure gives it away
        report = verify_ledger(path, key)
        assert not report.ok and report.first_bad_seq == 1, report
        assert "epoch" in report.reason


def test_forged_mac_in_the_current_epoch_is_caught_with_the_key(tmp_path: Path,
                                                                keys: Keys) -> None:
    path = tmp_path / "l.db"
    with Ledger.open(path, keys.hmac, node="n1") as led:
        led.append("cap", {"granted_mw": 300_000})
        led.append("cap", {"granted_mw": 300_001})
    forged = list(Ledger.open(path, node="n1").records())[1].body_bytes.replace(
        b"300000", b"900000")
    _rewrite_from(path, 1, forged, bytes(32), epoch=0)  # no key: a guessed one
    report = verify_ledger(path, keys.hmac)
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert "MAC does not verify" in report.reason


@pytest.mark.parametrize("gap_s", [0, 59, 60, 3600])
def test_any_gap_verifies(tmp_path: Path, keys: Keys, gap_s: int) -> None:
    clock = ManualClock()
    with Ledger.open(tmp_path / "l.db", keys.hmac, node="n1", clock=clock,
                     epoch_seconds=60) as led:
        for i in range(3):
            led.append("cap", {"i": i})
            clock.advance(gap_s)
            led.maintain()
    assert verify_ledger(tmp_path / "l.db", keys.hmac).ok
