"""The checking half of a merge: what one source adds to what the head node holds.

`prepare` reads only the source's rows past the node's stored head (a whole
ledger snapshot or a segment) and proves they continue the stored chain: the
source's hash at the stored head must be the stored one (else the histories
part: FORK at the first differing seq, the other side kept as evidence), the
first new record must link to it, and every new record is checked as at
genesis (seq, hash, envelope, MAC epochs, rotations). The node's stored Merkle
compact range is extended with the new leaves, so the root at every new
checkpoint (the node's own, signed; the witness's, cosigned) is compared without
reading an old row. A ledger shorter than the stored head, than a witnessed
checkpoint or than its own checkpoint is a ROLLBACK. The result is a `Plan`
that `merge` stores in one transaction; it writes nothing to the store, so it
can run in a worker process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from spark_slurm.errors import SparkError
from spark_slurm.head.frontier import NodeFrontier
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.proofs import NodeTree
from spark_slurm.head.scan import (
    REF_TAG,
    ChainScan,
    Identity,
    RawRecord,
    checkpoint_sizes,
    genesis_body,
    identify,
    ref_seq_of,
    signed_checkpoints,
)
from spark_slurm.head.source import (
    CopyReader,
    Source,
    discard,
    open_source,
    snapshot,
    source_hashes,
    split_arg,
)
from spark_slurm.head.store import Advance, ClusterReads, Finding, NodeState, StoredCheckpoint
from spark_slurm.ledger.keys import public_from_raw, public_raw

SAME_SEQ = "same seq, different record than the one merged earlier (both kept)"


@dataclass
class Plan:
    """What merging one source will do; `held` is the node state it was made against."""

    source: str
    node: str | None
    origin: str | None = None
    error: str | None = None
    findings: list[Finding] = field(default_factory=list)
    held: NodeState | None = None
    copy: Path | None = None
    advance: Advance | None = None
    forks: tuple[int, int] | None = None
    checkpoints: list[tuple[int, str, str]] = field(default_factory=list)
    read_rows: int = 0

    def discard(self) -> None:
        discard(self.copy)
        self.copy = None


class _Lookups:
    """Slow-path lookups: the private copy for new rows, the store for held ones."""

    def __init__(self, copy: CopyReader, store: ClusterReads, held: NodeState | None) -> None:
        self.copy, self.store, self.held = copy, store, held

    def hash_at(self, seq: int) -> bytes | None:
        if self.held is not None and self.held.head_seq is not None \
                and seq <= self.held.head_seq:
            return self.store.hash_at(self.held.node_id, seq)
        return self.copy.hash_at(seq)

    def seq_of_hash(self, value: bytes) -> int | None:
        return self.copy.seq_of_hash(value)


def stored_raw(store: ClusterReads, node_id: int, seq: int) -> RawRecord | None:
    """A stored record as the verifier reads rows (raw bytes)."""
    rec = store.record(node_id, seq)
    if rec is None:
        return None
    return RawRecord(rec.seq, rec.time_ns, rec.kind, rec.job_id, rec.body_bytes,
                     bytes.fromhex(rec.prev_hash), bytes.fromhex(rec.hash),
                     None if rec.mac is None else bytes.fromhex(rec.mac), rec.key_id)


def prepare(store: ClusterReads, arg: str, keys: KeyRing | None, workdir: Path, *,
            fast: bool = True) -> Plan:
    """Read and check one source against what `store` holds; see the module docstring.
    `fast=False` sends every record through the full checks (tests compare the two)."""
    try:
        src = open_source(arg)
    except SparkError as exc:
        expected, path = split_arg(arg)
        return Plan(str(path), expected, error=exc.message)
    try:
        return _identified(store, src, keys, workdir, fast)
    except SparkError as exc:
        return Plan(src.name, src.expected, error=exc.message)


def _identified(store: ClusterReads, src: Source, keys: KeyRing | None, workdir: Path,
                fast: bool) -> Plan:
    """Who the source is (its genesis; for a segment, the stored one), then the check."""
    genesis = genesis_body(src.genesis)
    held: NodeState | None = None
    if not genesis:
        name = src.expected or src.meta.get("node") or src.path.stem
        held = store.node(name)
        if src.kind == "ledger" or held is None or held.head_seq is None:
            return Plan(src.name, name, findings=[_no_genesis(src, name)])
        genesis = genesis_body(stored_raw(store, held.node_id, 0)) or {"node": name}
    ident, finding, name = identify(genesis, keys, src.expected, src.path.stem)
    plan = Plan(src.name, name, origin=ident.origin if ident else None)
    if ident is None:
        assert finding is not None
        plan.findings.append(finding)
        return plan
    plan.held = held if held is not None else store.node(name)
    try:
        _Check(store, src, ident, plan, workdir, fast=fast).run()
    except BaseException:
        plan.discard()
        raise
    return plan


def _no_genesis(src: Source, name: str) -> Finding:
    if src.kind == "segment":
        return Finding("GAP", name, 0, f"the head node holds nothing of node {name!r} and "
                       f"this segment starts after seq {src.after}: export it from the start "
                       "(--after -1)")
    return Finding("GAP", name, 0, "ledger does not start with its genesis record")


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


class _Check:
    """One source checked against one node's stored state, filling in `plan`."""

    def __init__(self, store: ClusterReads, src: Source, ident: Identity, plan: Plan,
                 workdir: Path, *, fast: bool) -> None:
        self.store, self.src, self.plan, self.workdir, self.fast = store, src, plan, workdir, fast
        self.held = plan.held
        self.head = self.held.head_seq if self.held is not None else None
        self.ident = _resumed(ident, self.held) \
            if self.held is not None and self.head is not None else ident
        self.node = ident.node
        self.start = 0 if self.head is None else self.head + 1

    def find(self, code: str, seq: int | None, detail: str) -> None:
        self.plan.findings.append(Finding(code, self.node, seq, detail))

    def run(self) -> None:
        src, held, head, start = self.src, self.held, self.head, self.start
        copy_from = src.after + 1 if src.kind == "segment" else start
        if copy_from > start:
            self.find("GAP", start, f"the head node holds up to seq {head}, this segment "
                      f"starts at seq {copy_from}: seqs {start}..{copy_from - 1} are missing "
                      f"(export --after {head})")
            return
        snap = snapshot(src, copy_from, head if src.kind == "ledger" else None, self.workdir)
        self.plan.copy, self.plan.read_rows = snap.copy, snap.rows
        size = snap.size
        if held is not None and head is not None:
            if size <= head:
                self.find("ROLLBACK", size, f"ledger ends at seq {size - 1} but the head node "
                          f"already holds up to seq {head}")
            overlap = min(head, size - 1)
            stored = self.store.hash_at(held.node_id, overlap) \
                if src.kind == "ledger" and overlap >= held.first_seq else None
            if stored is not None and snap.hash_at is not None and stored != snap.hash_at:
                self._fork(held, overlap)
                return
        # the witness checked each checkpoint consistent with the one before, so the
        # largest one speaks for all of them
        wit = self.store.largest_checkpoint(held.node_id, "witness") if held else None
        if wit is not None and size < wit.size:
            self.find("ROLLBACK", size, f"ledger holds {size} records but a witnessed "
                      f"checkpoint has {wit.size}")
        if self.plan.copy is None:
            if wit is not None and held is not None and not self._held_matches(held, wit):
                self.find("FORK", None, f"first {wit.size} records held differ from the "
                          "witnessed checkpoint")
            return
        copy = CopyReader(self.plan.copy)
        try:
            self._scan(copy, wit, size)
        finally:
            copy.close()

    def _held_matches(self, held: NodeState, cp: StoredCheckpoint) -> bool:
        """Whether the held chain has the witnessed root at its size (when it holds that
        many): a matching verified node checkpoint answers it, else the stored tree."""
        if cp.size > held.next_seq or cp.size == 0:
            return True
        if any(c.root == cp.root and c.source == "ledger"
               for c in self.store.checkpoints_at(held.node_id, cp.size)):
            return True
        if cp.size == held.next_seq:
            return NodeFrontier.from_bytes(cp.size, held.frontier).root().hex() == cp.root
        return NodeTree(self.store, held.node_id, cp.size).root().hex() == cp.root

    def _scan(self, copy: CopyReader, wit: StoredCheckpoint | None, size: int) -> None:
        held, head, start = self.held, self.head, self.start
        last = stored_raw(self.store, held.node_id, head) \
            if held is not None and head is not None else None
        if held is not None and head is not None:
            if last is None:
                self.find("GAP", head, f"the head node lost record {head}")
                return
            if self.src.kind == "segment" and not self._overlap_matches(copy, held):
                return
        texts = copy.checkpoints()
        marks = {s for s in checkpoint_sizes(texts) if s > start}
        if wit is not None and wit.size > start:
            marks.add(wit.size)
        frontier = NodeFrontier.from_bytes(start, held.frontier) \
            if held is not None and head is not None else NodeFrontier()
        scan = ChainScan(self.ident, _Lookups(copy, self.store, held), last=last,
                         fast=self.fast)
        if not self._feed(copy, scan, frontier, marks):
            return
        findings = list(scan.findings)
        if findings and self.src.kind == "segment" and head is not None \
                and findings[0].seq == start and findings[0].code == "TAMPERED" \
                and "does not link" in findings[0].detail:
            findings[0] = Finding("FORK", self.node, start, (
                "the segment's first record does not continue the chain the head node "
                f"holds up to seq {head}: the node holds another history"))
        self.plan.findings.extend(findings)
        accepted = scan.last_seq + 1  # the tree size the accepted records reach
        forked = self._judge_checkpoints(copy, texts, scan, frontier, last=last, size=size,
                                         accepted=accepted)
        if wit is not None and not forked:
            if start < wit.size <= accepted \
                    and frontier.roots.get(wit.size, b"").hex() != wit.root:
                self.find("FORK", None, f"first {wit.size} records differ from the witnessed "
                          "checkpoint")
                forked = True
            elif wit.size <= start and held is not None and not self._held_matches(held, wit):
                self.find("FORK", None, f"first {wit.size} records held differ from the "
                          "witnessed checkpoint")
                forked = True
        if forked:
            self.plan.checkpoints = []
        elif accepted > start:
            self.plan.advance = Advance(start, accepted - 1, scan.prev, frontier.to_bytes(),
                                        tuple(public_raw(k) for k in scan.signers),
                                        frontier.subtrees)

    def _feed(self, copy: CopyReader, scan: ChainScan, frontier: NodeFrontier,
              marks: set[int]) -> bool:
        """Check the copy's new rows page by page, writing each accepted row's leaf; False
        when the ledger does not start with its genesis (nothing to merge)."""
        sha = hashlib.sha256
        copy.begin()
        try:
            for page in copy.pages(self.start):
                if self.head is None and scan.last_seq < 0 and (
                        page[0].seq != 0 or page[0].kind != "genesis"):
                    self.find("GAP", 0, "ledger does not start with its genesis record (first "
                              f"seq is {page[0].seq})")
                    return False
                bad = _first_undecodable(page) if copy.lenient_pages else None
                taken = scan.feed(page if bad is None else page[:bad])
                if bad is not None and not scan.stopped:
                    scan.findings.append(Finding("TAMPERED", self.node, page[bad].seq,
                                                 "a text column is not valid UTF-8"))
                    scan.stopped = True
                good = page[:taken]
                leaves = [sha(b"\x00" + r.body).digest() for r in good]
                copy.add_leaves([(r.seq, leaf, _ref(r)) for r, leaf in
                                 zip(good, leaves, strict=True)])
                frontier.add(leaves, marks)
                if scan.stopped:
                    break
        finally:
            copy.commit()
        return True

    def _judge_checkpoints(self, copy: CopyReader, texts: list[str], scan: ChainScan,
                           frontier: NodeFrontier, *, last: RawRecord | None, size: int,
                           accepted: int) -> bool:
        """Check the node's own new checkpoints against the records; True on a FORK."""
        start, held = self.start, self.held
        valid, bad = signed_checkpoints(self.node, self.ident.origin, texts, scan.signers)
        self.plan.findings.extend(bad)
        for cp in valid:
            if cp.size < start or cp.size == 0 or (cp.size == start and held is None):
                continue
            if cp.size > size:
                self.find("ROLLBACK", size, f"ledger holds {size} records but its own "
                          f"checkpoint says {cp.size}")
                continue
            if cp.size > accepted:
                continue  # covers records past the first bad one: already reported
            if cp.size > start:
                root, head_hash = frontier.roots.get(cp.size), copy.hash_at(cp.size - 1)
            else:  # covers exactly what is held
                assert held is not None
                root = NodeFrontier.from_bytes(start, held.frontier).root()
                head_hash = last.hash if last is not None else None
            if root != cp.root or head_hash is None or head_hash.hex() != cp.head_hash:
                self.find("FORK", None, "records differ from the ledger's own signed "
                          f"checkpoint of size {cp.size}")
                return True
            self.plan.checkpoints.append((cp.size, cp.root.hex(), cp.text))
        return False

    def _overlap_matches(self, copy: CopyReader, held: NodeState) -> bool:
        """A segment that starts before the stored head must agree with what is held."""
        assert self.head is not None
        for page in copy.pages(self.src.after + 1):
            inside = [r for r in page if r.seq <= self.head]
            stored = self.store.stored_hashes(held.node_id, inside[0].seq, inside[-1].seq) \
                if inside else {}
            for r in inside:
                if r.seq >= held.first_seq and stored.get(r.seq) != r.hash:
                    self.find("FORK", r.seq, SAME_SEQ)
                    self._keep_fork_side(copy, held, r.seq, self.head)
                    return False
            if len(inside) < len(page):
                break
        return True

    def _fork(self, held: NodeState, overlap: int) -> None:
        """The source's hash at the last shared seq differs: find where the histories
        part and keep the source's side from there as evidence (nothing is merged)."""
        self.plan.discard()
        fork_at = overlap
        for page in source_hashes(self.src.path, held.first_seq, overlap):
            stored = self.store.stored_hashes(held.node_id, page[0][0], page[-1][0])
            diff = next((s for s, h in page if stored.get(s) != h), None)
            if diff is not None:
                fork_at = diff
                break
        self.find("FORK", fork_at, SAME_SEQ)
        snap = snapshot(self.src, fork_at, None, self.workdir)
        self.plan.copy = snap.copy
        if snap.copy is not None:
            copy = CopyReader(snap.copy)
            try:
                self._keep_fork_side(copy, held, fork_at, overlap)
            finally:
                copy.close()

    def _keep_fork_side(self, copy: CopyReader, held: NodeState, first: int,
                        last: int) -> None:
        """Keep the source's records first..last that chain on from the held record
        first-1 (the node's other history, checked as any record is) as fork evidence."""
        before = stored_raw(self.store, held.node_id, first - 1) if first > 0 else None
        scan = ChainScan(self.ident, _Lookups(copy, self.store, None), last=before,
                         fast=self.fast)
        for page in copy.pages(first):
            inside = [r for r in page if r.seq <= last]
            scan.feed(inside)
            if scan.stopped or len(inside) < len(page):
                break
        if scan.last_seq >= first:
            self.plan.forks = (first, scan.last_seq)


def _ref(rec: RawRecord) -> int | None:
    """The `ref.seq` the store indexes for audit's follow-up lookups (a JSON true is 1,
    as SQLite would store it)."""
    ref = ref_seq_of(rec.body) if REF_TAG in rec.body else None
    return None if ref is None else int(ref)


def _first_undecodable(page: list[RawRecord]) -> int | None:
    """On a page read leniently, the first row with U+FFFD in a text column (invalid
    UTF-8 on disk): it would be stored as its raw bytes, not as what was checked."""
    for i, rec in enumerate(page):
        if any(isinstance(v, str) and "\ufffd" in v for v in (rec.kind, rec.job_id, rec.key_id)):
            return i
    return None
