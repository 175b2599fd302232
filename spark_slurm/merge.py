"""`sparkctl merge`: fold node ledgers into the head node's cluster ledger.

Each node ledger (a snapshot, never the live file) is read in full and checked
record by record — seq continuity, chain link, hash over the stored bytes, the
columns against the hashed envelope, MAC with that node's K[0], the origin —
and its checkpoints are checked against the node's public key. Only records
that pass and continue the stored chain are appended, copied byte for byte;
everything else becomes a finding with a fixed code, the node and the seq. A
node that fails never blocks the others, and running a merge twice changes
nothing (findings are recorded once; nothing is stamped with the run time).
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import LedgerError, SparkError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.proofs import update_blocks
from spark_slurm.head.scan import REF_TAG, NodeScan, RawRecord, scan_node
from spark_slurm.headdb import Finding, HeadDb
from spark_slurm.ledger.schema import PER_COLUMNS, open_existing
from spark_slurm.witness import node_of, witnessed

CODES = ("GAP", "FORK", "ROLLBACK", "DUPLICATE", "REORDER", "TAMPERED", "FOREIGN_ORIGIN",
         "UNKNOWN_KEY", "EPOCH_GAP")

Progress = Callable[[int], None]
PARALLEL_MIN_RECORDS = 50_000  # below this, starting worker processes costs more than it saves


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


def read_node_ledger(path: Path) -> tuple[list[RawRecord], list[str]]:
    """Every row and checkpoint text of a node ledger, read-only, in seq order."""
    conn, _meta = open_existing(path)
    lenient = conn.text_factory
    try:
        # strict UTF-8 is sqlite3's C decoder; a damaged text column makes it raise, and
        # then the rows are read again through the ledger's lenient (U+FFFD) decoder
        conn.text_factory = str
        try:
            rows = conn.execute(_SELECT_ROWS).fetchall()
        except sqlite3.OperationalError:
            conn.text_factory = lenient
            rows = conn.execute(_SELECT_ROWS).fetchall()
        cps = [r[0] for r in conn.execute("SELECT text FROM checkpoint ORDER BY id")]
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: unreadable ledger: {exc}") from None
    finally:
        conn.close()
    make = RawRecord._make
    out = []
    for r in rows:
        if type(r[4]) is bytes and type(r[5]) is bytes and type(r[6]) is bytes:
            out.append(make(r))
        else:  # columns rewritten with another type: keep their bytes, let the scan judge
            out.append(RawRecord(r[0], r[1], r[2], r[3], _raw(r[4]), _raw(r[5]), _raw(r[6]),
                                 None if r[7] is None else _raw(r[7]), r[8]))
    return out, cps


_SELECT_ROWS = f"SELECT {PER_COLUMNS} FROM per ORDER BY seq"  # noqa: S608


def _raw(value: object) -> bytes:
    """Column bytes as stored; a value rewritten as TEXT keeps its UTF-8 bytes."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _split_source(arg: str) -> tuple[str | None, Path]:
    """`NODE=PATH` pins the node a file must belong to; a bare PATH trusts its genesis."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(arg)


@dataclass
class Prepared:
    """A node ledger read and scanned, ready to be compared with the stored state."""

    source: str
    scan: NodeScan
    ledger_size: int


def prepare(arg: str, keys: KeyRing | None) -> Prepared | NodeResult:
    """Read and scan one source (`PATH` or `NODE=PATH`): the CPU-heavy, DB-free half of
    a merge, which can run in another process. An unusable file is a NodeResult error."""
    expected, path = _split_source(arg)
    try:
        records, cps = read_node_ledger(path)
    except SparkError as exc:
        return NodeResult(source=str(path), node=expected, error=exc.message)
    scan = scan_node(records, cps, keys, expected, fallback_name=path.stem)
    return Prepared(str(path), scan, (records[-1].seq + 1) if records else 0)


def _prepare_with_keys(arg: str, keys_dir: Path | None) -> Prepared | NodeResult:
    """`prepare` in a worker process: keys are loaded there (they do not pickle)."""
    return prepare(arg, KeyRing.load(keys_dir) if keys_dir is not None else None)


def merge_node(db: HeadDb, prepared: Prepared, now_ns: int) -> NodeResult:
    """Compare a scanned node ledger with what the head holds and append what is new."""
    scan, source, ledger_size = prepared.scan, prepared.source, prepared.ledger_size
    result = NodeResult(source=source, node=scan.node)
    findings = list(scan.findings)
    if scan.node is None or not scan.mergeable:
        return _finish(db, result, findings, source, now_ns)
    state = db.ensure_node(scan.node, scan.origin)
    stored_head = state.head_seq
    good = scan.good
    witnessed = [c for c in db.checkpoints(state.node_id) if c.source == "witness"]
    if witnessed:
        # the witness checked each checkpoint consistent with the one before, so the
        # largest one speaks for all of them
        last = witnessed[-1]
        if ledger_size < last.size:
            findings.append(Finding("ROLLBACK", scan.node, ledger_size,
                                    f"ledger holds {ledger_size} records but a witnessed "
                                    f"checkpoint has {last.size}"))
        elif len(good) >= last.size and scan.tree().root(last.size).hex() != last.root:
            findings.append(Finding("FORK", scan.node, None,
                                    f"first {last.size} records differ from the witnessed "
                                    "checkpoint"))
            good = []
    if stored_head is not None:
        if ledger_size <= stored_head:
            findings.append(Finding("ROLLBACK", scan.node, ledger_size,
                                    f"ledger ends at seq {ledger_size - 1} but the head node "
                                    f"already holds up to seq {stored_head}"))
        overlap = min(stored_head, len(good) - 1)
        same_head = overlap >= 0 and db.stored_hashes(
            state.node_id, overlap, overlap).get(overlap) == good[overlap].hash
        if overlap >= 0 and not same_head:
            # both chains verify from genesis, so equal hashes at the last shared seq mean
            # an identical prefix; otherwise find where the histories part
            stored = db.stored_hashes(state.node_id, 0, overlap)
            for rec in good[:overlap + 1]:
                if stored.get(rec.seq) != rec.hash:
                    findings.append(Finding("FORK", scan.node, rec.seq,
                                            "same seq, different record than the one merged "
                                            "earlier (both kept)"))
                    for other in good[rec.seq:overlap + 1]:
                        db.add_fork(state.node_id, other.as_stored(scan.node), source)
                    good = []
                    break
    new = good[stored_head + 1:] if stored_head is not None else good  # good[i].seq == i
    if new:
        db.append_rows(_bound_rows(state.node_id, new, scan.leaves), new[-1].seq,
                       new[-1].hash.hex())
        update_blocks(db, state.node_id, state.count, state.count + len(new), scan.leaves,
                      tree=scan.tree())
        result.appended = len(new)
    for cp in scan.valid_checkpoints:
        if cp.size <= len(good) or (stored_head is not None and cp.size <= stored_head + 1):
            db.add_checkpoint(state.node_id, cp.size, cp.root.hex(), cp.text, "ledger")
    refreshed = db.node(scan.node)
    result.head_seq = refreshed.head_seq if refreshed else None
    return _finish(db, result, findings, source, now_ns)


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
    first taking in every checkpoint the witness at `witness_state` has cosigned."""
    keys = KeyRing.load(keys_dir) if keys_dir is not None else None
    with HeadDb.open(into, create=True) as db:
        if witness_state is not None:
            import_witnessed(db, witness_state)
        return merge_into(db, sources, keys, clock=clock, progress=progress, workers=workers)


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
               workers: int | None = None) -> MergeSummary:
    """Merge into an open cluster ledger; one transaction per node.

    With `workers` > 1 (and at least PARALLEL_MIN_RECORDS rows to merge), sources are
    read and scanned by that many processes while this one applies the previous node,
    so verification and the SQLite writes overlap. The default is 1: on the shared
    2-core machine the benchmark runs on, spawning and pickling cost what they saved."""
    if workers is None or len(sources) < 2 or count_records(sources) < PARALLEL_MIN_RECORDS:
        workers = 1
    results = []
    with db.bulk_writes():
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # never fork a process holding SQLite
            keys_dir = keys.directory if keys is not None else None
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                prepared: Iterator[Prepared | NodeResult] = pool.map(
                    _prepare_with_keys, sources, [keys_dir] * len(sources))
                for item in prepared:
                    results.append(_apply(db, item, clock, progress))
        else:
            for arg in sources:
                results.append(_apply(db, prepare(arg, keys), clock, progress))
    return MergeSummary(into=str(db.path), results=results)


def _apply(db: HeadDb, item: Prepared | NodeResult, clock: Clock,
           progress: Progress | None) -> NodeResult:
    if isinstance(item, NodeResult):
        return item
    # one write transaction per node, taken before reading the node's stored state,
    # so a concurrent merge into the same file waits instead of racing
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        result = merge_node(db, item, clock.now_ns())
    except BaseException:
        db.conn.rollback()
        raise
    db.conn.commit()
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
