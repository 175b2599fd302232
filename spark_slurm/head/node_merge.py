"""Merging one source into one node's chain in the cluster store.

Everything happens in one store transaction with the node locked: the node's
stored head, compact range and keys are read, then only the source's rows past
that head are read, each checked on its way into the store (`RowCheck`, called by
the store's own `INSERT ... SELECT` or `COPY` loop), so what is checked is what
is stored. Before the rows: the source's hash at the stored head must be the
stored one (else the histories part: FORK at the first differing seq, the other
side kept as evidence, nothing merged), and a source that ends before the head,
before a witnessed checkpoint or before its own checkpoint is a ROLLBACK. While
the rows stream, the first must link to the stored head and every one is checked
as at genesis (seq, hash, envelope, MAC epochs, rotations), and the stored
compact range grows with their leaves, so the root at every new checkpoint (the
node's own, signed; the witness's, cosigned) is compared without reading an old
row; a root that differs undoes the rows (FORK).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spark_slurm.errors import SparkError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.proofs import node_tree
from spark_slurm.head.scan import (
    ChainScan,
    Identity,
    RawRecord,
    checkpoint_sizes,
    genesis_body,
    identify,
    signed_checkpoints,
)
from spark_slurm.head.source import PAGE, Source, SourceReader, split_arg
from spark_slurm.head.store import (
    Advance,
    ClusterReads,
    ClusterStore,
    Finding,
    NodeState,
    NodeWriter,
    StoredCheckpoint,
)
from spark_slurm.ledger.chain import GENESIS_PREV, Chain, leaf_hash
from spark_slurm.ledger.cut import NO_ARCHIVE, cut_of
from spark_slurm.ledger.keys import public_from_raw, public_raw

SAME_SEQ = "same seq, different record than the one merged earlier (both kept)"


@dataclass
class NodeResult:
    """What one source contributed to a merge."""

    source: str
    node: str | None
    appended: int = 0
    head_seq: int | None = None
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    read: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.findings

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "node": self.node, "appended": self.appended,
                "head_seq": self.head_seq, "ok": self.ok, "error": self.error,
                "read": self.read, "findings": [f.to_json() for f in self.findings]}


class RowCheck:
    """Called once per new row, in seq order, by the store as it copies the row in:
    the row's Merkle leaf when it checks out, None from the first that does not
    (the store then stores nothing from there on). The accepted rows' leaves and
    hashes go into the node's `Chain` (its stored compact range, resumed) a page
    at a time; it keeps the root and head at every checkpoint size in `marks` and
    the perfect subtrees the store keeps for proofs."""

    def __init__(self, make_scan: Callable[[], ChainScan], frontier: bytes, start: int,
                 head: bytes, marks: set[int]) -> None:
        self.make_scan, self.initial, self.start, self.marks = make_scan, frontier, start, marks
        self.head = head
        self.restart()

    def restart(self) -> None:
        self.scan = self.make_scan()
        self.accept = self.scan.accept
        self.chain = Chain.from_bytes(self.start, self.initial, self.head)
        self.chain.marks = frozenset(self.marks)
        self.chain.subtrees = []
        self.leaves: list[bytes] = []
        self.hashes: list[bytes] = []
        self.read = 0

    def __call__(self, rec: Sequence[Any]) -> bytes | None:
        """`rec` is a RawRecord or a plain tuple of the same columns (SQLite's call)."""
        self.read += 1
        if not self.accept(rec):
            return None
        leaf = leaf_hash(rec[4])
        self.leaves.append(leaf)
        self.hashes.append(rec[6])
        if len(self.leaves) >= PAGE:
            self.flush()
        return leaf

    def stop(self, code: str, seq: int, why: str) -> None:
        self.read += 1
        self.scan.stop(code, seq, why)

    def flush(self) -> None:
        if self.leaves:
            self.chain.add_leaves(self.leaves, self.hashes)
            self.leaves, self.hashes = [], []


class _Lookups:
    """The scan's slow-path lookups: the source, or the store for held seqs (on their
    own connections: the rows stream through the store's write connection)."""

    def __init__(self, source: SourceReader, reads: ClusterReads, held: NodeState | None) -> None:
        self.source, self.reads, self.held = source, reads, held

    def hash_at(self, seq: int) -> bytes | None:
        if self.held is not None and self.held.head_seq is not None \
                and seq <= self.held.head_seq:
            return self.reads.hash_at(self.held.node_id, seq)
        return self.source.hash_at(seq)

    def seq_of_hash(self, value: bytes) -> int | None:
        return self.source.seq_of_hash(value)


def stored_raw(store: ClusterReads, node_id: int, seq: int) -> RawRecord | None:
    """A stored record as the verifier reads rows (raw bytes)."""
    rec = store.record(node_id, seq)
    if rec is None:
        return None
    return RawRecord(rec.seq, rec.time_ns, rec.kind, rec.job_id, rec.body_bytes,
                     bytes.fromhex(rec.prev_hash), bytes.fromhex(rec.hash),
                     None if rec.mac is None else bytes.fromhex(rec.mac), rec.key_id)


def merge_source(store: ClusterStore, reads: ClusterReads, arg: str, keys: KeyRing | None,
                 now_ns: int, *, fast: bool = True) -> NodeResult:
    """Merge one source (`PATH` or `NODE=PATH`) into `store`; `reads` is a second
    connection to the same store for lookups while rows stream. `fast=False` sends
    every record through the full checks (tests compare the two)."""
    try:
        reader = SourceReader.open(arg)
    except SparkError as exc:
        expected, path = split_arg(arg)
        return NodeResult(str(path), expected, error=exc.message)
    src = reader.source
    try:
        return _merge(store, reads, src, reader, keys, now_ns=now_ns, fast=fast)
    except SparkError as exc:
        return NodeResult(src.name, src.expected, error=exc.message)
    finally:
        reader.close()


def _merge(store: ClusterStore, reads: ClusterReads, src: Source, reader: SourceReader,
           keys: KeyRing | None, *, now_ns: int, fast: bool) -> NodeResult:
    genesis = genesis_body(src.genesis)
    name = src.expected or src.meta.get("node") or src.path.stem
    if not genesis:
        held = reads.node(name)
        if src.kind == "ledger" or held is None or held.head_seq is None:
            return _findings_only(store, src, name, [_no_genesis(src, name)], now_ns)
        genesis = genesis_body(stored_raw(reads, held.node_id, 0)) or {"node": name}
    ident, finding, name = identify(genesis, keys, src.expected, src.path.stem)
    if ident is None:
        assert finding is not None
        return _findings_only(store, src, name, [finding], now_ns)
    seen = reads.node(name)
    after = seen.head_seq if seen is not None and seen.head_seq is not None else -1
    if seen is not None and after >= 0 and _nothing_new(reads, src, reader, seen):
        return NodeResult(src.name, name, 0, after, [])
    with store.writer(src.path, node=name, after=after) as w:
        held = w.lock_node(name, ident.origin)
        merge = _NodeMerge(w, reads, src, reader, ident, held=held, fast=fast)
        merge.run()
        for f in merge.findings:
            w.add_finding(f, src.name, now_ns)
    return NodeResult(src.name, name, merge.appended,
                      merge.head if merge.head >= 0 else None, merge.findings,
                      read=merge.read)


def _nothing_new(reads: ClusterReads, src: Source, reader: SourceReader,
                 held: NodeState) -> bool:
    """The common nightly case, answered without a write transaction: the source ends
    exactly at the stored head, with the stored hash there, and the largest witnessed
    checkpoint neither exceeds it nor disagrees with it, nor does any of its own.
    Anything else (new rows, a rollback, a fork, a segment overlapping the head) takes
    the full path."""
    head = held.head_seq
    if head is None or reader.size != held.next_seq or held.head_hash is None:
        return False
    if reader.checkpoints(reader.size):  # its own checkpoint says it held more: ROLLBACK
        return False
    if src.kind == "segment" and src.after != head:
        return False
    if src.kind == "ledger" and reader.hash_at(head) != bytes.fromhex(held.head_hash):
        return False
    wit = reads.largest_checkpoint(held.node_id, "witness")
    if wit is None or wit.size <= held.first_seq:
        return True
    if wit.size > reader.size:
        return False  # shorter than what the witness saw: the full path names it
    if wit.size == held.next_seq:
        return Chain.from_bytes(wit.size, held.frontier).root().hex() == wit.root
    return any(c.root == wit.root and c.source == "ledger"
               for c in reads.checkpoints_at(held.node_id, wit.size))


def _findings_only(store: ClusterStore, src: Source, name: str, findings: list[Finding],
                   now_ns: int) -> NodeResult:
    with store.writer(None) as w:
        for f in findings:
            w.add_finding(f, src.name, now_ns)
    held = store.node(name)
    return NodeResult(src.name, name, 0, held.head_seq if held else None, findings)


def _no_genesis(src: Source, name: str) -> Finding:
    if src.kind == "segment":
        return Finding("GAP", name, 0, f"the head node holds nothing of node {name!r} and "
                       f"this segment starts after seq {src.after}: export it from the start "
                       "(--after -1)")
    if src.after >= 0:
        return Finding("GAP", name, 0, _pruned(src, f"the head node holds nothing of node "
                                                    f"{name!r}"))
    return Finding("GAP", name, 0, "ledger does not start with its genesis record")


def _pruned(src: Source, held: str) -> str:
    """A pruned node ledger that starts after what the head node holds."""
    cut = cut_of(src.meta, src.name)
    archives = cut.archive_list if cut is not None else NO_ARCHIVE
    return (f"{held}, and this node ledger was pruned before seq {src.after + 1}: merge "
            f"{archives} first (sparkctl ledger prune wrote them)")


def _resumed(ident: Identity, held: NodeState) -> Identity:
    """The signing keys followed up to the stored head (the trust store's first)."""
    signers = []
    for raw in held.signers:
        try:
            signers.append(public_from_raw(raw))
        except SparkError:
            continue
    if not signers:
        return ident
    if ident.signers and public_raw(ident.signers[0]) != held.signers[0]:
        signers = [ident.signers[0], *signers]
    return Identity(ident.node, ident.origin, ident.k0, tuple(signers))


class _NodeMerge:
    """One source against one locked node, inside the store transaction."""

    def __init__(self, w: NodeWriter, reads: ClusterReads, src: Source, reader: SourceReader,
                 ident: Identity, *, held: NodeState, fast: bool) -> None:
        self.w, self.reads, self.src, self.reader, self.fast = w, reads, src, reader, fast
        self.held = held
        self.head = -1 if held.head_seq is None else held.head_seq
        self.start = self.head + 1
        self.ident = _resumed(ident, held) if self.head >= 0 else ident
        self.node = ident.node
        self.findings: list[Finding] = []
        self.appended = 0
        self.read = 0

    def find(self, code: str, seq: int | None, detail: str) -> None:
        self.findings.append(Finding(code, self.node, seq, detail))

    def run(self) -> None:
        src, held, head, start, size = self.src, self.held, self.head, self.start, \
            self.reader.size
        if src.after + 1 > start:
            if src.kind == "segment":
                self.find("GAP", start, f"the head node holds up to seq {head}, this segment "
                          f"starts at seq {src.after + 1}: seqs {start}..{src.after} are "
                          f"missing (export --after {head})")
            else:
                self.find("GAP", start, _pruned(src, f"the head node holds up to seq {head}"
                                                if head >= 0 else "the head node holds nothing "
                                                f"of node {self.node!r}"))
            return
        if head >= 0:
            if size <= head:
                self.find("ROLLBACK", size, f"ledger ends at seq {size - 1} but the head node "
                          f"already holds up to seq {head}")
            if not self._agrees_with_held():
                return
        # the witness checked each checkpoint consistent with the one before, so the
        # largest one speaks for all of them
        wit = self.reads.largest_checkpoint(held.node_id, "witness")
        if wit is not None and size < wit.size:
            self.find("ROLLBACK", size, f"ledger holds {size} records but a witnessed "
                      f"checkpoint has {wit.size}")
        if wit is not None and wit.size <= start and not self._held_matches(wit):
            self.find("FORK", None, f"first {wit.size} records held differ from the "
                      "witnessed checkpoint")
            return
        # at the held head, the node's own checkpoints past its end are still judged
        if size > start or (size == start and self.reader.checkpoints(start)):
            self._append(wit)

    def _agrees_with_held(self) -> bool:
        """The source's hash at the last seq both hold must be the stored one; a segment
        that starts before the head is compared row by row. False after a FORK."""
        held, head = self.held, self.head
        if self.src.kind == "segment":
            lo = max(self.src.after + 1, held.first_seq)
            for page in self.reader.hashes(lo, head):
                held_page = self.reads.stored_hashes(held.node_id, page[0][0], page[-1][0])
                diff = next((s for s, h in page if held_page.get(s) != h), None)
                if diff is not None:
                    self._fork(diff, head)
                    return False
            return True
        overlap = min(head, self.reader.size - 1)
        if overlap < held.first_seq:
            return True
        mine, stored = self.reader.hash_at(overlap), self.reads.hash_at(held.node_id, overlap)
        if mine is None or stored is None or mine == stored:
            return True
        fork_at = overlap  # find where the histories part (only now are old hashes read)
        for page in self.reader.hashes(held.first_seq, overlap):
            got = self.reads.stored_hashes(held.node_id, page[0][0], page[-1][0])
            diff = next((s for s, h in page if got.get(s) != h), None)
            if diff is not None:
                fork_at = diff
                break
        self._fork(fork_at, overlap)
        return False

    def _fork(self, first: int, last: int) -> None:
        """Keep the source's records first..last that chain on from the held record
        first-1 (the node's other history, checked as any record is) as evidence."""
        self.find("FORK", first, SAME_SEQ)
        before = stored_raw(self.reads, self.held.node_id, first - 1) if first > 0 else None
        scan = ChainScan(self.ident, _Lookups(self.reader, self.reads, None), last=before,
                         fast=self.fast)
        kept: list[RawRecord] = []
        for page in self.reader.pages(first, last):
            taken = scan.feed(page)
            kept.extend(page[:taken])
            if scan.stopped:
                break
        if kept:
            self.w.keep_forks(self.held.node_id, kept, self.src.name)

    def _held_matches(self, cp: StoredCheckpoint) -> bool:
        """Whether the held chain has the witnessed root at its size: a matching
        verified node checkpoint answers it, else the stored range or tree."""
        held = self.held
        if cp.size > held.next_seq or cp.size == 0 or cp.size <= held.first_seq:
            return True  # not all held yet, or archived (it was checked when merged)
        if any(c.root == cp.root and c.source == "ledger"
               for c in self.reads.checkpoints_at(held.node_id, cp.size)):
            return True
        if cp.size == held.next_seq:
            return Chain.from_bytes(cp.size, held.frontier).root().hex() == cp.root
        try:
            return node_tree(self.reads, held.node_id, cp.size).root().hex() == cp.root
        except ValueError:  # held leaves missing: the held chain cannot have that root
            return False

    def _append(self, wit: StoredCheckpoint | None) -> None:
        held, head, start = self.held, self.head, self.start
        last = stored_raw(self.reads, held.node_id, head) if head >= 0 else None
        if head >= 0 and last is None:
            self.find("GAP", head, f"the head node lost record {head}")
            return
        if head < 0:
            first = self.reader.first_seq()
            if first != 0 or self.src.genesis is None or self.src.genesis.kind != "genesis":
                self.find("GAP", 0, "ledger does not start with its genesis record (first seq "
                          f"is {first})")
                return
        texts = self.reader.checkpoints(start)
        marks = {s for s in checkpoint_sizes(texts) if s > start}
        if wit is not None and wit.size > start:
            marks.add(wit.size)
        lookups = _Lookups(self.reader, self.reads, held)
        check = RowCheck(lambda: ChainScan(self.ident, lookups, last=last, fast=self.fast),
                         held.frontier if head >= 0 else b"", start,
                         last.hash if last is not None else GENESIS_PREV, marks)
        self.w.mark()
        count = self.w.append(held, start, check)
        check.flush()
        scan, chain = check.scan, check.chain
        self.read = check.read
        findings = list(scan.findings)
        if findings and self.src.kind == "segment" and head >= 0 \
                and findings[0].seq == start and findings[0].code == "TAMPERED" \
                and "does not link" in findings[0].detail:
            findings[0] = Finding("FORK", self.node, start, (
                "the segment's first record does not continue the chain the head node "
                f"holds up to seq {head}: the node holds another history"))
        self.findings.extend(findings)
        accepted = scan.last_seq + 1  # the tree size the accepted records reach
        if count != accepted - start:  # the store and the check disagree: a bug, not input
            raise SparkError(f"{self.src.name}: stored {count} rows, checked "
                             f"{accepted - start}")
        checkpoints, forked = self._judge(texts, check, last=last, accepted=accepted)
        if not forked and wit is not None and start < wit.size <= accepted \
                and (chain.root_at(wit.size) or b"").hex() != wit.root:
            self.find("FORK", None, f"first {wit.size} records differ from the witnessed "
                      "checkpoint")
            forked = True
        if forked or count == 0:
            self.w.undo()
            return
        if chain.size != accepted or chain.head != scan.prev:  # a bug, not input
            raise SparkError(f"{self.src.name}: the tree reached {chain.size} records, the "
                             f"check {accepted}")
        self.w.set_head(held, Advance(start, accepted - 1, scan.prev, chain.to_bytes(),
                                      tuple(public_raw(k) for k in scan.signers),
                                      chain.subtrees or []))
        for size, root, text in checkpoints:
            self.w.add_checkpoint(held.node_id, size, root, text, "ledger")
        self.appended, self.head = count, accepted - 1

    def _judge(self, texts: list[str], check: RowCheck, *, last: RawRecord | None,
               accepted: int) -> tuple[list[tuple[int, str, str]], bool]:
        """The node's own new checkpoints against the records: those to keep (every one
        the node's key signed that the accepted records reach: each is a proof anchor,
        e.g. for an archive cut later), and whether one contradicts the records (a
        FORK: nothing is merged)."""
        start, size = self.start, self.reader.size
        scan, chain = check.scan, check.chain
        valid, bad = signed_checkpoints(self.node, self.ident.origin, texts, scan.signers)
        self.findings.extend(bad)
        keep: list[tuple[int, str, str]] = []
        for cp in valid:
            if cp.size < start or cp.size == 0:
                continue
            if cp.size > size:
                self.find("ROLLBACK", size, f"ledger holds {size} records but its own "
                          f"checkpoint says {cp.size}")
                continue
            if cp.size > accepted:
                continue  # covers records past the first bad one: already reported
            if cp.size > start:
                root, head_hash = chain.root_at(cp.size), chain.head_at(cp.size)
            else:  # covers exactly what is held
                root = Chain.from_bytes(start, self.held.frontier).root()
                head_hash = last.hash if last is not None else None
            if root != cp.root or head_hash is None or head_hash.hex() != cp.head_hash:
                self.find("FORK", None, "records differ from the ledger's own signed "
                          f"checkpoint of size {cp.size}")
                return [], True
            keep.append((cp.size, cp.root.hex(), cp.text))
        return keep, False
