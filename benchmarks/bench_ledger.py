"""Ledger benchmarks: durable single append, batched appends, verification rate.

Each figure stands beside a baseline from the same run on the same file system:
a raw sqlite3 insert of the same bytes (WAL, synchronous=FULL) for appends, and
bare hashlib over the same bytes for verification.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness, ledger_scale
from spark_slurm.ledger import Ledger, VerifyReport, verify_ledger, verify_par
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key
from spark_slurm.ledger.records import body_bytes

SINGLE = 300
BATCH = 1000
BATCHES = 30
ROUNDS = 3
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


def _encode_floor(bodies: list[dict[str, Any]]) -> float:
    """Records per CPU-second for the unavoidable per-record work alone."""
    sha256 = hashlib.sha256
    c0 = time.thread_time()
    for _ in range(3):
        for body in bodies:
            data = body_bytes(body)
            sha256(bytes(32) + data).digest()
            sha256(b"\x00" + data).digest()
    return 3 * len(bodies) / (time.thread_time() - c0)


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed_verify(db: Path, key: bytes | None, *,
                  one_cpu: bool) -> tuple[VerifyReport, float, float]:
    """verify_ledger's wall and CPU seconds (this process and its reaped workers)."""
    cpus = os.sched_getaffinity(0)
    if one_cpu:
        os.sched_setaffinity(0, {min(cpus)})
    try:
        t0, c0 = time.perf_counter(), _cpu()
        report = verify_ledger(db, key)
        return report, time.perf_counter() - t0, _cpu() - c0
    finally:
        os.sched_setaffinity(0, cpus)


def run() -> list[harness.Section]:
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        sections = [_run(Path(tmp))]
    if os.environ.get(ledger_scale.SIZES_ENV) != "0":  # =0 skips the ledgers of millions
        sections.append(ledger_scale.section())
    return sections


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

    # 2. batched appends: append_many of BATCH (one transaction, one fsync), rounds
    # alternating with the raw executemany baseline; best round of each (noisy machine).
    bodies = [("cap", cap_body(i)) for i in range(BATCH)]
    rows = [_row(i, stored) for i in range(BATCH)]
    best = {"led": (0.0, 0.0), "raw": (0.0, 0.0)}
    next_raw = iter(range(10**6, 10**9, BATCH))

    def raw_batch() -> None:
        start = next(next_raw)
        raw.execute("BEGIN")
        raw.executemany("INSERT INTO per VALUES (?,?,?,?,?,?,?,?,?)",
                        [(start + i, *r[1:]) for i, r in enumerate(rows)])
        raw.execute("COMMIT")

    for _ in range(ROUNDS):
        for name, fn in (("led", lambda: led.append_many(bodies)), ("raw", raw_batch)):
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(BATCHES // ROUNDS):
                fn()
            n = BATCHES // ROUNDS * BATCH
            wall, cpu = n / (time.perf_counter() - t0), n / (time.thread_time() - c0)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    raw.close()
    floor = _encode_floor([b for _, b in bodies])
    (rate, cpu_rate), (raw_rate, raw_cpu) = best["led"], best["raw"]
    section.figures += [
        harness.Figure(f"batched append_many({BATCH})", rate, "PER/s",
                       "raw sqlite3 executemany (no encoding/hashing)", raw_rate,
                       "≥ 50,000 PER/s", rate >= 50_000),
        harness.Figure(f"append_many({BATCH}) per CPU-second (writer thread)", cpu_rate,
                       "PER/s", "raw sqlite3 executemany per CPU-second", raw_cpu),
        harness.Figure(f"append_many({BATCH}) per CPU-second (writer thread)", cpu_rate,
                       "PER/s", "floor: exact-type check + C json encode + 2 sha256, "
                       "no SQLite", floor),
    ]

    # 3. verification rate over a ledger of VERIFY_RECORDS
    while led.size < VERIFY_RECORDS:
        led.append_many(bodies[: min(BATCH, VERIFY_RECORDS - led.size)])
    led.checkpoint()
    led.close()
    db = tmp / "node.db"
    runs: dict[str, list[tuple[float, float]]] = {"key": [], "plain": [], "seq": []}
    count = 0
    for _ in range(ROUNDS):
        for name, key, one_cpu in (("key", k0, False), ("plain", None, False),
                                   ("seq", k0, True)):
            report, wall_s, cpu_s = _timed_verify(db, key, one_cpu=one_cpu)
            assert report.ok, report.summary()
            count = report.count
            runs[name].append((count / wall_s, count / cpu_s))
    conn = sqlite3.connect(db)
    data = conn.execute("SELECT prev_hash, body FROM per").fetchall()
    conn.close()
    sha256 = hashlib.sha256
    t0 = time.perf_counter()
    for prev, body in data:
        sha256(prev + body).digest()
    hash_rate = len(data) / (time.perf_counter() - t0)
    key_wall, key_cpu = (max(r[i] for r in runs["key"]) for i in (0, 1))
    plain_wall = max(r[0] for r in runs["plain"])
    seq_wall, seq_cpu = (max(r[i] for r in runs["seq"]) for i in (0, 1))
    section.figures += [
        harness.Figure("verify_ledger with HMAC key", key_wall, "PER/s",
                       "same, pinned to one CPU (sequential reference walk)", seq_wall,
                       "≥ 250,000 PER/s", key_wall >= 250_000),
        harness.Figure("verify_ledger with HMAC key", key_wall, "PER/s",
                       "bare hashlib sha256 over the same bytes (one core)", hash_rate),
        harness.Figure("verify_ledger without key", plain_wall, "PER/s",
                       "bare hashlib sha256 over the same bytes (one core)", hash_rate,
                       "≥ 250,000 PER/s", plain_wall >= 250_000),
        harness.Figure("verify_ledger with HMAC key, per CPU-second (all processes)",
                       key_cpu, "PER/s", "sequential reference walk per CPU-second",
                       seq_cpu),
    ]
    section.notes.append(
        f"Best of {ROUNDS} alternating rounds for each figure and its baseline. verify uses "
        f"{verify_par.workers()} worker processes on ledgers of ≥ "
        f"{verify_par.MIN_CHUNKS << verify_par.CHUNK_BITS} records (chunks of "
        f"{1 << verify_par.CHUNK_BITS}); pinned to one CPU it runs the sequential walk.")
    section.notes.append(
        f"verify covers {count} records: chain hash, column binding, Merkle tree, "
        "the checkpoints, epoch MACs and SQLite integrity_check.")
    return section


if __name__ == "__main__":
    for sec in run():
        for fig in sec.figures:
            print(fig)
