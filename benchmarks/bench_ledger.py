"""Ledger benchmarks: durable single append, batched appends, verification rate.

Each figure stands beside a baseline from the same run on the same file system:
a raw sqlite3 insert of the same bytes (WAL, synchronous=FULL) for appends, and
bare hashlib over the same bytes for verification.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key

SINGLE = 300
BATCH = 1000
BATCHES = 30
VERIFY_RECORDS = 100_000


def cap_body(i: int) -> dict[str, Any]:
    """A representative `cap` PER body (two GPUs, as docs/per-schema.md describes)."""
    return {
        "v": 1, "node": "n1", "job_id": str(100_000 + i % 977),
        "requester": {"uid": 0, "user": "root", "role": "scheduler"},
        "authority": "slurm-prolog", "source": "socket",
        "decision": {"action": "clamp", "rule": "training-cap", "reason": "class ceiling",
                     "requested_mw": 700_000, "granted_mw": 400_000, "policy_sha256": "ab" * 32},
        "gpus": [{"index": g, "uuid": f"GPU-{g:08d}", "previous_mw": 700_000,
                  "intended_mw": 400_000, "readback_mw": 400_000, "ok": True,
                  "before": {"time_ns": 1_700_000_000_000_000_000 + i, "power_mw": 350_123,
                             "temp_mc": 61_000, "util_pct": 97, "limit_mw": 700_000}}
                 for g in range(2)],
        "paths": {"telemetry": "ok", "context": "ok", "facility": "pending",
                  "policy": "clamp", "ledger": "committed"},
    }


def _raw_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE per (seq INTEGER PRIMARY KEY, time_ns INTEGER, kind TEXT, "
                 "job_id TEXT, body BLOB, prev_hash BLOB, hash BLOB, mac BLOB, key_id TEXT)")
    return conn


def _row(i: int, stored: bytes) -> tuple[object, ...]:
    return (i, time.time_ns(), "cap", "1", stored, bytes(32), bytes(32), bytes(32), "k:0")


def run() -> list[harness.Section]:
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        return [_run(Path(tmp))]


def _run(tmp: Path) -> harness.Section:
    files = keygen(tmp / "keys")
    k0 = load_hmac_key(files.hmac_key)
    led = Ledger.open(tmp / "node.db", k0, load_signing_key(files.signing_key), node="n1",
                      cluster="bench")
    stored = next(iter(led.records())).body_bytes  # genesis, only for its size below
    sample = led.append("cap", cap_body(0))
    stored = next(iter(led.records(since=sample.seq))).body_bytes
    section = harness.Section(
        "Ledger: durable appends and verification",
        ".venv/bin/python -m benchmarks bench_ledger",
        notes=[f"PER body: a two-GPU `cap` record, {len(stored)} stored bytes; HMAC on; "
               f"machine load average at start {os.getloadavg()[0]:.1f} "
               f"on {os.cpu_count()} CPUs (other work shares this machine)."])

    # 1. single durable append (one fsync each) vs raw insert + fsync
    lat = harness.time_calls(lambda: led.append("cap", cap_body(1)), SINGLE)
    raw = _raw_db(tmp / "raw.db")
    counter = iter(range(1, 10**9))
    raw_lat = harness.time_calls(
        lambda: raw.execute("INSERT INTO per VALUES (?,?,?,?,?,?,?,?,?)",
                            _row(next(counter), stored)), SINGLE)
    p50, p99 = harness.percentile(lat, 50), harness.percentile(lat, 99)
    section.figures += [
        harness.Figure("single durable append p50", p50, "ms", "raw sqlite3 insert+fsync p50",
                       harness.percentile(raw_lat, 50)),
        harness.Figure("single durable append p99", p99, "ms", "raw sqlite3 insert+fsync p99",
                       harness.percentile(raw_lat, 99), "p99 ≤ 5 ms", p99 <= 5.0),
    ]

    # 2. batched appends: append_many of BATCH (one transaction, one fsync)
    bodies = [("cap", cap_body(i)) for i in range(BATCH)]
    t0 = time.perf_counter()
    for _ in range(BATCHES):
        led.append_many(bodies)
    rate = BATCHES * BATCH / (time.perf_counter() - t0)
    rows = [_row(i, stored) for i in range(BATCH)]
    t0 = time.perf_counter()
    for b in range(BATCHES):
        raw.execute("BEGIN")
        raw.executemany("INSERT INTO per VALUES (?,?,?,?,?,?,?,?,?)",
                        [(10**6 + b * BATCH + i, *r[1:]) for i, r in enumerate(rows)])
        raw.execute("COMMIT")
    raw_rate = BATCHES * BATCH / (time.perf_counter() - t0)
    raw.close()
    section.figures.append(harness.Figure(
        f"batched append_many({BATCH})", rate, "PER/s", "raw sqlite3 executemany", raw_rate,
        "≥ 50,000 PER/s", rate >= 50_000))

    # 3. verification rate over a ledger of VERIFY_RECORDS
    while led.size < VERIFY_RECORDS:
        led.append_many(bodies[: min(BATCH, VERIFY_RECORDS - led.size)])
    led.checkpoint()
    led.close()
    t0 = time.perf_counter()
    report = verify_ledger(tmp / "node.db", k0)
    verify_s = time.perf_counter() - t0
    assert report.ok, report.summary()
    t0 = time.perf_counter()
    plain = verify_ledger(tmp / "node.db")
    plain_s = time.perf_counter() - t0
    conn = sqlite3.connect(tmp / "node.db")
    data = conn.execute("SELECT prev_hash, body FROM per").fetchall()
    conn.close()
    sha256 = hashlib.sha256
    t0 = time.perf_counter()
    for prev, body in data:
        sha256(prev + body).digest()
    hash_rate = len(data) / (time.perf_counter() - t0)
    section.figures += [
        harness.Figure("verify_ledger with HMAC key", report.count / verify_s, "PER/s",
                       "bare hashlib sha256 over the same bytes", hash_rate,
                       "≥ 250,000 PER/s", report.count / verify_s >= 250_000),
        harness.Figure("verify_ledger without key", plain.count / plain_s, "PER/s",
                       "bare hashlib sha256 over the same bytes", hash_rate,
                       "≥ 250,000 PER/s", plain.count / plain_s >= 250_000),
    ]
    section.notes.append(
        f"verify covers {report.count} records: chain hash, column binding, Merkle tree, "
        f"{report.checkpoints_checked} checkpoints, epoch MACs and SQLite integrity_check.")
    return section


if __name__ == "__main__":
    for sec in run():
        for fig in sec.figures:
            print(fig)
