"""Verify a large ledger on every core: seq chunks scanned by worker processes.

Each worker runs the verifier's one scan (`scan_worker.Scan`: chain link, hash,
Merkle tree, columns, epoch MACs) over its chunks of the file and returns, per
chunk, the first failure if any, the rows that move verifier state, its Merkle
compact range and the marks asked for. The parent feeds the state-moving rows
through `slow_row` in seq order and grafts the chunks' subtrees onto one
`Chain`; chunks are 2^k records at multiples of 2^k, so they combine into the
RFC 6962 tree. The first failure in seq order (a chunk's, or a state row's
before it) is the verdict, as the sequential walk would give it. A worker that
cannot judge its chunk (it died, the file changed shape under it) makes the
caller run the sequential walk. Workers read pages through SQLite's own small
cache (no mmap), so memory stays a few MiB per process whatever the ledger size.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from spark_slurm.ledger import scan_worker
from spark_slurm.ledger.chain import Chain, fold
from spark_slurm.ledger.cut import Cut
from spark_slurm.ledger.scan_worker import Result, Task
from spark_slurm.ledger.verify_walk import Bad, Walk, slow_row, walk_below

CHUNK_BITS = 14
"""Records per chunk = 2^CHUNK_BITS; ledgers under MIN_CHUNKS chunks go sequential."""
MIN_CHUNKS = 2


def workers() -> int:
    """Processes to use: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def walk_parallel(conn: sqlite3.Connection, path: Path, w: Walk, k0: bytes | None,
                  *, procs: int | None = None, chunk_bits: int = CHUNK_BITS,
                  cut: Cut | None = None) -> bool:
    """Fill `w` as `walk` would and return True (raising Bad where `walk` would),
    or return False (w untouched) when the ledger is small, there is one CPU, a
    cut is not on a chunk boundary, or a worker could not judge its chunk."""
    procs = workers() if procs is None else procs
    size = 1 << chunk_bits
    first = 0 if cut is None else cut.seq
    try:  # a damaged file is the sequential walk's to describe
        # two rowid lookups, not a COUNT(*) (a pass over the whole table before any
        # worker starts): a record missing inside a chunk is that chunk's finding; one
        # missing at a chunk's end leaves the next chunk without the hash it starts
        # from (head_before), so that worker declines
        low = conn.execute("SELECT MIN(seq) FROM per WHERE seq >= ?", (first,)).fetchone()[0]
        high = conn.execute("SELECT MAX(seq) FROM per").fetchone()[0]
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        return False
    if procs < 2 or low != first or first % size or high + 1 - first < MIN_CHUNKS * size:
        return False  # (a row at `first` makes MAX(seq) an integer)
    count = int(high) + 1
    hmac_id = w.meta.get("hmac_key_id") or None  # the genesis must agree (slow_row, seq 0)
    scratch = Walk(w.meta, k0, w.need)
    chain = Chain()
    if cut is not None:  # the rows below the cut move state first, in seq order
        chain, below, below_sum = walk_below(conn, scratch, cut)
        scratch.subtrees = (below, below_sum)
        if cut.seq in w.need:
            scratch.roots[cut.seq] = (chain.root(), chain.head)
    tasks: list[Task] = [
        (str(path), lo, min(lo + size, count), hmac_id, k0,
         tuple(sorted(s for s in w.need if lo < s <= lo + size)),
         chain.head if cut is not None and lo == first else None)
        for lo in range(first, count, size)]
    # SQLite's integrity check (needed last) runs meanwhile on this snapshot, in a
    # thread: SQLite releases the GIL, so it overlaps with waiting for the workers.
    check = threading.Thread(target=_integrity, args=(conn, scratch), daemon=True)
    check.start()
    try:
        results = _run_workers(tasks, min(procs, len(tasks)))
        if results is None:
            return False
        bad = _combine(results, scratch, count, chain)
    finally:
        check.join()
    w.parallel = True  # the workers judged it, whichever way
    if bad is not None:
        raise bad
    _adopt(w, scratch)
    return True


WORKER_ARGS: tuple[str, ...] = ("-E", "-s", "-S", scan_worker.__file__)
"""How a worker interpreter starts: no PYTHON* variables, user site or
site-packages, and scan_worker run as a script (it imports its stdlib-only
siblings, not the package). sparkctl verify may run as root, and the worker needs
nothing from the environment or an installed package (and it starts faster).
Mutation runs replace it (tests/unit/ledger/conftest.py): mutmut's trampolines
live in site-packages and pick the active mutant by module name, which a sibling
import (`chain`, not `spark_slurm.ledger.chain`) never matches."""


def _run_workers(tasks: list[Task], procs: int) -> list[Result] | None:
    """Chunks dealt round-robin to `procs` fresh interpreters; results in chunk
    order, or None when any worker fails or declines a chunk."""
    out: list[list[Result | None] | None] = [None] * procs

    def run(i: int) -> None:
        try:
            done = subprocess.run([sys.executable, *WORKER_ARGS],
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
    ordered = [parts[i % procs][i // procs] for i in range(len(tasks))]
    if any(r is None for r in ordered):
        return None
    return [r for r in ordered if r is not None]


def _integrity(conn: sqlite3.Connection, w: Walk) -> None:
    try:
        w.integrity = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        w.integrity = exc


def _combine(results: Iterable[Result], scratch: Walk, count: int, chain: Chain
             ) -> Bad | None:
    """Feed chunk results, in seq order, into `scratch` and grow `chain` (empty, or
    standing at a cut) from them; the first failure, if any."""
    chain.subtrees = []
    subtree_count, subtree_sum = scratch.subtrees
    latest: dict[str, int] = dict(scratch.latest)
    for bad, special, end, head, hashes, marked, n_subs, sum_subs, newest in results:
        try:
            for row in special:
                slow_row(scratch, row)
        except Bad as exc:
            return exc
        if bad is not None:
            return Bad(*bad)
        for size, local, h in marked:
            at = chain.copy()
            _graft(at, local, size)
            scratch.roots[size] = (fold(at.hashes), h)
        _graft(chain, hashes, end)
        chain.head = head
        subtree_count += n_subs
        subtree_sum += sum_subs
        latest.update(newest)  # chunks in seq order: later ones win
    subs = chain.subtrees or []
    subtree_count += len(subs)
    subtree_sum += sum(scan_worker.subtree_digest(*s) for s in subs)
    chain.subtrees = None
    scratch.count, scratch.head, scratch.chain = count, chain.head, chain
    scratch.subtrees = (subtree_count, subtree_sum % 2**256)
    scratch.latest = latest
    return None


def _graft(chain: Chain, local: list[bytes], end: int) -> None:
    """Graft a chunk's compact range (its perfect subtrees, largest first) onto
    `chain`, which stands at the chunk's start; afterwards it stands at `end`."""
    n = end - chain.size
    levels = [k for k in range(n.bit_length() - 1, -1, -1) if n >> k & 1]
    for h, level in zip(local, levels, strict=True):
        chain.push(h, level)


def _adopt(w: Walk, scratch: Walk) -> None:
    w.count, w.head, w.integrity = scratch.count, scratch.head, scratch.integrity
    w.chain = scratch.chain
    w.subtrees = scratch.subtrees
    w.latest = scratch.latest
    w.roots.update(scratch.roots)
    w.hmac_id, w.epoch, w.sealed = scratch.hmac_id, scratch.epoch, scratch.sealed
    w.signing[:] = scratch.signing
    w.node = scratch.node
