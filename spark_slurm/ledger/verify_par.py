"""Verify a large ledger on every core: seq chunks checked by worker processes.

Each worker (scan_worker) checks its chunks exactly as `verify_walk.walk` checks
those rows (contiguity, prev link from the boundary row's stored hash, column
binding, chain hash, epoch MACs on the fast path, leaf hashes) and returns its
Merkle subtree roots plus the few rows that move verifier state, which the
parent feeds through `slow_row` in seq order. Chunks are 2^k records at
multiples of 2^k, so chunk roots combine into the RFC 6962 tree. Anything
unexpected (a bad row, an unreadable page, a failed worker, a short ledger)
returns False and the caller runs the sequential reference walk, so verdicts and
first bad seqs never differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from spark_slurm.ledger import scan_worker
from spark_slurm.ledger.records import GENESIS_PREV
from spark_slurm.ledger.scan_worker import MMAP_BYTES, Result, Task
from spark_slurm.ledger.verify_walk import Bad, Walk, slow_row

CHUNK_BITS = 14
"""Records per chunk = 2^CHUNK_BITS; ledgers under MIN_CHUNKS chunks go sequential."""
MIN_CHUNKS = 2


def workers() -> int:
    """Processes to use: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _fold(hashes: list[bytes]) -> bytes:
    """Root over perfect subtrees listed largest first (as Frontier.root)."""
    r = hashes[-1]
    for x in reversed(hashes[:-1]):
        r = hashlib.sha256(b"\x01" + x + r).digest()
    return r


def walk_parallel(conn: sqlite3.Connection, path: Path, w: Walk, k0: bytes | None,
                  *, procs: int | None = None, chunk_bits: int = CHUNK_BITS) -> bool:
    """Fill `w` as `walk` would and return True, or return False (w untouched)
    when the ledger is small, has one CPU, or anything fails a check."""
    procs = workers() if procs is None else procs
    size = 1 << chunk_bits
    try:  # a damaged file is the reference walk's to describe
        lo_hi = conn.execute("SELECT MIN(seq), MAX(seq), COUNT(*) FROM per").fetchone()
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        return False
    if procs < 2 or lo_hi is None or lo_hi[0] != 0 or lo_hi[2] != lo_hi[1] + 1 \
            or lo_hi[2] < MIN_CHUNKS * size:
        return False
    count = int(lo_hi[2])
    readable, hmac_id = _genesis_hmac_id(conn)
    if not readable:
        return False
    tasks: list[Task] = [
        (str(path), lo, min(lo + size, count), hmac_id, k0,
         tuple(s for s in w.need if lo < s <= lo + size)) for lo in range(0, count, size)]
    scratch = Walk(w.meta, k0, w.need)
    # SQLite's integrity check (needed last) runs meanwhile on this snapshot, in a
    # thread: SQLite releases the GIL, so it overlaps with waiting for the workers.
    check = threading.Thread(target=_integrity, args=(conn, scratch), daemon=True)
    check.start()
    try:
        results = _run_workers(tasks, min(procs, len(tasks)))
        if results is None or not _combine(results, scratch, count, size):
            return False
    finally:
        check.join()
    _adopt(w, scratch)
    return True


def _run_workers(tasks: list[Task], procs: int) -> list[Result] | None:
    """Chunks dealt round-robin to `procs` fresh interpreters; results in chunk
    order, or None when any worker fails."""
    script = scan_worker.__file__
    out: list[list[Result] | None] = [None] * procs

    def run(i: int) -> None:
        try:
            done = subprocess.run([sys.executable, "-E", "-s", "-S", script],
                                  input=pickle.dumps(tasks[i::procs]), capture_output=True,
                                  check=True, timeout=3600)
            out[i] = pickle.loads(done.stdout)  # noqa: S301 - our own child's output
        except (OSError, subprocess.SubprocessError, pickle.UnpicklingError, EOFError):
            out[i] = None

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parts = [p for p in out if p is not None]
    if len(parts) != procs or sum(len(p) for p in parts) != len(tasks):
        return None
    return [parts[i % procs][i // procs] for i in range(len(tasks))]


def _integrity(conn: sqlite3.Connection, w: Walk) -> None:
    try:
        w.integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        w.integrity = exc


def _combine(results: Iterable[Result], scratch: Walk, count: int, size: int) -> bool:
    """Feed chunk results, in seq order, into `scratch`; False on any failure."""
    chunk_tree: list[bytes] = []  # frontier over whole chunks (level CHUNK_BITS)
    chunks = 0
    tail: list[bytes] = []
    head = GENESIS_PREV
    for ok, special, fh, at_need, last in results:
        if not ok:
            return False
        try:
            for seq, kind, body, h, mac, key_id in special:
                slow_row(scratch, (seq, kind, body, h, mac, key_id))
        except Bad:
            return False
        for s, local, h in at_need:
            scratch.roots[s] = (_fold(chunk_tree + local), h)
        head = last
        if len(fh) == 1 and chunks * size + size <= count:
            chunks += 1
            leaf, n = fh[0], chunks - 1
            while n & 1:
                leaf = hashlib.sha256(b"\x01" + chunk_tree.pop() + leaf).digest()
                n >>= 1
            chunk_tree.append(leaf)
        else:
            tail = fh
    scratch.count, scratch.head = count, head
    scratch.frontier.hashes[:] = chunk_tree + tail
    scratch.frontier.size = count
    return True


def _genesis_hmac_id(conn: sqlite3.Connection) -> tuple[bool, str | None]:
    """The genesis record's hmac_key_id (what `walk` will hold); (False, None) when
    it cannot be read, so the reference walk reports why."""
    try:
        row = conn.execute("SELECT CAST(body AS BLOB) FROM per WHERE seq = 0").fetchone()
        inner = json.loads(row[0])["body"]
        hid = inner.get("hmac_key_id")
    except (ValueError, KeyError, TypeError, AttributeError, sqlite3.DatabaseError):
        return False, None
    return (hid is None or isinstance(hid, str)), hid if isinstance(hid, str) else None


def _adopt(w: Walk, scratch: Walk) -> None:
    w.count, w.head, w.integrity = scratch.count, scratch.head, scratch.integrity
    w.frontier.hashes[:] = scratch.frontier.hashes
    w.frontier.size = scratch.frontier.size
    w.roots.update(scratch.roots)
    w.hmac_id, w.epoch, w.sealed = scratch.hmac_id, scratch.epoch, scratch.sealed
    w.signing[:] = scratch.signing
    w.node = scratch.node
