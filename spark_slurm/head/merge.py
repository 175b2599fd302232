"""`sparkctl merge`: fold node ledgers into the head node's cluster ledger.

Each node ledger (a snapshot, never the live file) is copied into a private
directory, and that copy is read in full and checked record by record — seq
continuity, chain link, hash over the stored bytes, the columns against the
hashed envelope, MAC with that node's K[0], the origin —
and its checkpoints are checked against the node's public key. Only records
that pass and continue the stored chain are appended, copied byte for byte from
the same private copy (so nothing can be swapped in between check and copy);
everything else becomes a finding with a fixed code, the node and the seq. A
node that fails never blocks the others, and running a merge twice changes
nothing (findings are recorded once; nothing is stamped with the run time).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import HeadDbError, LedgerError, SparkError
from spark_slurm.head.headdb import Finding, HeadDb
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.proofs import update_blocks
from spark_slurm.head.scan import REF_TAG, NodeScan, RawRecord, scan_node
from spark_slurm.head.source import (
    attached,
    copy_forks,
    copy_rows,
    private_copy,
    read_rows,
)
from spark_slurm.head.witness import node_of, witnessed
from spark_slurm.ledger.schema import open_existing

CODES = ("GAP", "FORK", "ROLLBACK", "DUPLICATE", "REORDER", "TAMPERED", "FOREIGN_ORIGIN",
         "UNKNOWN_KEY", "EPOCH_GAP")

Progress = Callable[[int], None]
PARALLEL_MIN_RECORDS = 50_000  # below this, starting worker processes costs more than it saves
DEFAULT_WORKERS = 4


@dataclass
class NodeResult:
    """What one source ledger contributed to a merge."""

    source: str
    node: str | None
    appended: int = 0
    head_seq: int | None = None
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "node": self.node, "appended": self.appended,
                "head_seq": self.head_seq, "ok": self.ok, "error": self.error,
                "findings": [f.to_json() for f in self.findings]}


@dataclass
class MergeSummary:
    into: str
    results: list[NodeResult]

    @property
    def appended(self) -> int:
        return sum(r.appended for r in self.results)

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.results for f in r.findings]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"into": self.into, "ok": self.ok, "appended": self.appended,
                "findings": [f.to_json() for f in self.findings],
                "nodes": [r.to_json() for r in self.results]}


def _split_source(arg: str) -> tuple[str | None, Path]:
    """`NODE=PATH` pins the node a file must belong to; a bare PATH trusts its genesis."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(arg)


@dataclass
class Prepared:
    """A node ledger read and scanned, ready to be compared with the stored state.

    With `copy`, new records are copied by SQL from that private copy (the file the
    scan read) and `scan.good` may be empty; without, they are bound from `scan.good`."""

    source: str
    scan: NodeScan
    ledger_size: int
    copy: Path | None = None


def prepare(arg: str, keys: KeyRing | None, workdir: Path | None = None
            ) -> Prepared | NodeResult:
    """Read and scan one source (`PATH` or `NODE=PATH`): the CPU-heavy, DB-free half of
    a merge, which can run in another process. With `workdir`, the source is first
    copied there and the copy is what is read. An unusable file is a NodeResult error."""
    expected, path = _split_source(arg)
    copy = None
    try:
        if workdir is not None:
            copy = private_copy(path, workdir)
        records, cps, exact = read_rows(copy or path, path)
    except SparkError as exc:
        _discard(copy)
        return NodeResult(source=str(path), node=expected, error=exc.message)
    if not exact:
        _discard(copy)
        copy = None
    scan = scan_node(records, cps, keys, expected, fallback_name=path.stem)
    return Prepared(str(path), scan, (records[-1].seq + 1) if records else 0, copy)


def _prepare_in_worker(arg: str, keys_dir: Path | None, workdir: Path
                       ) -> Prepared | NodeResult:
    """`prepare` in a worker process. Keys are loaded there (they do not pickle), and
    records that will be copied by SQL are not sent back: only hashes and leaves are."""
    item = prepare(arg, KeyRing.load(keys_dir) if keys_dir is not None else None, workdir)
    if isinstance(item, Prepared) and item.copy is not None:
        item.scan.good = []
    return item


def _discard(copy: Path | None) -> None:
    if copy is not None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)


def merge_node(db: HeadDb, prepared: Prepared, now_ns: int) -> NodeResult:
    """Compare a scanned node ledger with what the head holds and append what is new."""
    scan, source, ledger_size = prepared.scan, prepared.source, prepared.ledger_size
    result = NodeResult(source=source, node=scan.node)
    findings = list(scan.findings)
    if scan.node is None or not scan.mergeable:
        return _finish(db, result, findings, source, now_ns)
    state = db.ensure_node(scan.node, scan.origin)
    stored_head = state.head_seq
    hashes = scan.hashes  # hashes[i] is the verified record of seq i
    witnessed = [c for c in db.checkpoints(state.node_id) if c.source == "witness"]
    if witnessed:
        # the witness checked each checkpoint consistent with the one before, so the
        # largest one speaks for all of them
        last = witnessed[-1]
        if ledger_size < last.size:
            findings.append(Finding("ROLLBACK", scan.node, ledger_size,
                                    f"ledger holds {ledger_size} records but a witnessed "
                                    f"checkpoint has {last.size}"))
        elif len(hashes) >= last.size and scan.tree().root(last.size).hex() != last.root:
            findings.append(Finding("FORK", scan.node, None,
                                    f"first {last.size} records differ from the witnessed "
                                    "checkpoint"))
            hashes = []
    if stored_head is not None:
        if ledger_size <= stored_head:
            findings.append(Finding("ROLLBACK", scan.node, ledger_size,
                                    f"ledger ends at seq {ledger_size - 1} but the head node "
                                    f"already holds up to seq {stored_head}"))
        overlap = min(stored_head, len(hashes) - 1)
        same_head = overlap >= 0 and db.stored_hashes(
            state.node_id, overlap, overlap).get(overlap) == hashes[overlap]
        if overlap >= 0 and not same_head:
            # both chains verify from genesis, so equal hashes at the last shared seq mean
            # an identical prefix; otherwise find where the histories part
            stored = db.stored_hashes(state.node_id, 0, overlap)
            for seq in range(overlap + 1):
                if stored.get(seq) != hashes[seq]:
                    findings.append(Finding("FORK", scan.node, seq,
                                            "same seq, different record than the one merged "
                                            "earlier (both kept)"))
                    _keep_forks(db, prepared, state.node_id, seq, overlap)
                    hashes = []
                    break
    first = stored_head + 1 if stored_head is not None else 0
    if first < len(hashes):
        new = len(hashes) - first
        _append(db, prepared, state.node_id, first, len(hashes) - 1)
        update_blocks(db, state.node_id, state.count, state.count + new, scan.leaves,
                      tree=scan.tree())
        result.appended = new
    for cp in scan.valid_checkpoints:
        if cp.size <= len(hashes) or (stored_head is not None and cp.size <= stored_head + 1):
            db.add_checkpoint(state.node_id, cp.size, cp.root.hex(), cp.text, "ledger")
    refreshed = db.node(scan.node)
    result.head_seq = refreshed.head_seq if refreshed else None
    return _finish(db, result, findings, source, now_ns)


def _append(db: HeadDb, prepared: Prepared, node_id: int, first: int, last: int) -> None:
    """Store verified seqs first..last: by SQL from the private copy, or bound from memory."""
    scan = prepared.scan
    if prepared.copy is not None:
        copy_rows(db, node_id, first, last, leaves=scan.leaves,
                  head_hash=scan.hashes[last].hex())
        return
    new = scan.good[first:last + 1]
    db.append_rows(_bound_rows(node_id, new, scan.leaves), last, new[-1].hash.hex())


def _keep_forks(db: HeadDb, prepared: Prepared, node_id: int, first: int, last: int) -> None:
    """Keep this source's side of a fork (seqs first..last) as evidence."""
    if prepared.copy is not None:
        copy_forks(db, node_id, first, last, prepared.source)
        return
    node = prepared.scan.node or ""
    for rec in prepared.scan.good[first:last + 1]:
        db.add_fork(node_id, rec.as_stored(node), prepared.source)


def _bound_rows(node_id: int, records: Sequence[RawRecord], leaves: Sequence[bytes]
                ) -> list[tuple[Any, ...]]:
    """Rows for `HeadDb.append_rows`, shaped for sqlite3's cheap binding path.

    sqlite3 binds int, str and bytearray directly but sends bytes and None through
    its adapter lookup, which costs more than the insert itself; so blobs go in as
    bytearray (stored as the same BLOB) and a missing MAC or ref as '' (NULL there)."""
    ba = bytearray
    return [(node_id, seq, time_ns, kind, job_id, ba(body), ba(prev_hash), ba(rec_hash),
             "" if mac is None else ba(mac), key_id,
             ("" if (ref := r.ref_seq()) is None else ref) if REF_TAG in body else "",
             ba(leaves[seq]))
            for r in records
            for seq, time_ns, kind, job_id, body, prev_hash, rec_hash, mac, key_id in (r,)]


def _finish(db: HeadDb, result: NodeResult, findings: list[Finding], source: str,
            now_ns: int) -> NodeResult:
    for f in findings:
        db.add_finding(f, source, now_ns)
    result.findings = findings
    return result


def merge_ledgers(into: Path, sources: Sequence[str], *, keys_dir: Path | None = None,
                  witness_state: Path | None = None, clock: Clock = SYSTEM_CLOCK,
                  progress: Progress | None = None, workers: int | None = None
                  ) -> MergeSummary:
    """Merge node ledgers (`PATH` or `NODE=PATH`) into the cluster ledger at `into`,
    first taking in every checkpoint the witness at `witness_state` has cosigned.

    `workers` processes (see `worker_count`) copy and check node ledgers while this
    one stores the previous node; with one, everything runs in this process."""
    keys = KeyRing.load(keys_dir) if keys_dir is not None else None
    count = worker_count(workers, sources)
    # the workers are forked first, while this process holds no SQLite file or thread
    with _scanners(count) as pool, HeadDb.open(into, create=True) as db, \
            _workdir(into) as workdir:
        if witness_state is not None:
            import_witnessed(db, witness_state)
        return merge_into(db, sources, keys, clock=clock, progress=progress, pool=pool,
                          workdir=workdir, lookahead=2 * count)


def worker_count(workers: int | None, sources: Sequence[str]) -> int:
    """How many checking processes a merge of `sources` gets (1: none). Asked for a
    number, that many (at most one per source); by default, up to DEFAULT_WORKERS and
    one per CPU, for at least PARALLEL_MIN_RECORDS rows."""
    if workers is None:
        if len(sources) < 2 or count_records(sources) < PARALLEL_MIN_RECORDS:
            return 1
        workers = min(DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    return max(1, min(workers, len(sources)))


@contextmanager
def _scanners(count: int) -> Iterator[ProcessPoolExecutor | None]:
    if count < 2:
        yield None
        return
    # fork, not spawn: a spawned worker re-imports the package (~0.3 s each here)
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork")) as pool:
        pool.submit(int).result()  # with fork, the first task starts every worker
        yield pool


@contextmanager
def _workdir(into: Path) -> Iterator[Path]:
    """A directory only this user can write, beside the cluster ledger (node ledgers can
    be large; /tmp may be memory), removed afterwards."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix=".spark-merge-", dir=into.parent)
    except OSError as exc:
        raise HeadDbError(f"{into.parent}: cannot make a working directory: "
                          f"{exc.strerror}") from None
    with tmp as name:
        yield Path(name)


def import_witnessed(db: HeadDb, state: Path) -> int:
    """Copy the witness's checkpoints into the cluster ledger (idempotent)."""
    cps = witnessed(state)
    with db.conn:
        for cp in cps:
            node = db.ensure_node(node_of(cp.origin), cp.origin)
            db.add_checkpoint(node.node_id, cp.size, cp.root.hex(), cp.text, "witness")
    return len(cps)


def merge_into(db: HeadDb, sources: Sequence[str], keys: KeyRing | None, *,
               clock: Clock = SYSTEM_CLOCK, progress: Progress | None = None,
               pool: ProcessPoolExecutor | None = None, workdir: Path | None = None,
               lookahead: int = 4) -> MergeSummary:
    """Merge into an open cluster ledger; one transaction per node.

    With `workdir`, each source is copied there first and its rows are stored from
    that copy by SQL; with `pool` too, the copying and checking run in the pool, up
    to `lookahead` sources ahead of the node being stored. Without `workdir`, rows
    are read here and bound from memory (the path `load_node_ledger` takes)."""
    results = []
    with db.bulk_writes():
        if pool is not None and workdir is not None:
            keys_dir = keys.directory if keys is not None else None
            for item in _ahead(pool, sources, keys_dir, workdir, max(1, lookahead)):
                results.append(apply_prepared(db, item, clock, progress))
        else:
            for arg in sources:
                results.append(apply_prepared(db, prepare(arg, keys, workdir), clock, progress))
    return MergeSummary(into=str(db.path), results=results)


def _ahead(pool: ProcessPoolExecutor, sources: Sequence[str], keys_dir: Path | None,
           workdir: Path, depth: int) -> Iterator[Prepared | NodeResult]:
    """Each source prepared in the pool, in order, at most `depth` ahead (each holds a
    copy of its ledger on disk until it is stored)."""
    pending: deque[Future[Prepared | NodeResult]] = deque()
    for arg in sources:
        pending.append(pool.submit(_prepare_in_worker, arg, keys_dir, workdir))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def apply_prepared(db: HeadDb, item: Prepared | NodeResult, clock: Clock = SYSTEM_CLOCK,
                   progress: Progress | None = None) -> NodeResult:
    """Store one prepared source in its own transaction, then drop its private copy."""
    if isinstance(item, NodeResult):
        return item
    source: AbstractContextManager[None] = (
        attached(db, item.copy) if item.copy is not None else nullcontext())
    try:
        with source:
            # one write transaction per node, taken before reading the node's stored
            # state, so a concurrent merge into the same file waits instead of racing
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                result = merge_node(db, item, clock.now_ns())
            except BaseException:
                db.conn.rollback()
                raise
            db.conn.commit()
    finally:
        _discard(item.copy)
    if progress is not None:
        progress(item.ledger_size)
    return result


@contextmanager
def load_node_ledger(path: Path, keys: KeyRing | None = None,
                     clock: Clock = SYSTEM_CLOCK) -> Iterator[tuple[HeadDb, list[Finding]]]:
    """A node ledger merged into a throwaway in-memory cluster ledger (for audit/replay)."""
    item = prepare(str(path), keys)
    if isinstance(item, NodeResult):
        raise LedgerError(item.error or f"{path}: unusable ledger")
    db = HeadDb.open(Path(":memory:"), create=True)
    try:
        with db.conn:
            result = merge_node(db, item, clock.now_ns())
        yield db, result.findings
    finally:
        db.close()


def count_records(sources: Sequence[str]) -> int:
    """How many rows the sources hold in all (for a progress bar's length)."""
    total = 0
    for arg in sources:
        _, path = _split_source(arg)
        try:
            conn, _ = open_existing(path)
        except SparkError:
            continue
        try:
            total += int(conn.execute("SELECT count(*) FROM per").fetchone()[0])
        except sqlite3.DatabaseError:
            pass
        finally:
            conn.close()
    return total
