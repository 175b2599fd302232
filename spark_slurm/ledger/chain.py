"""The hash chain and the RFC 6962 Merkle tree over a ledger's records, in one place.

Appending (`Ledger`), verifying (`sparkctl verify`, sequential or on every core)
and merging (the head node, which keeps each node's compact range as bytes in
its store) all move the same state forward: the hash of the last record and the
tree's compact range (one perfect-subtree hash per set bit of the size, largest
first). `Chain` holds that state; this module is the only code that computes a
chain link `H(prev ‖ body)`, a leaf `H(0x00 ‖ body)` or an interior node
`H(0x01 ‖ left ‖ right)`, and `continues` is the one statement of the link rule
(next seq, stored prev hash = the head, hash = H(head ‖ body)) that append,
verify and merge's per-row check all apply, so none can accept what another
refuses.

Its loops are written for speed (locals, hashes in list comprehensions):
`link` makes new records' hashes, `accept` checks stored rows and stops before
the first that does not continue the chain, `add_leaves` takes leaf hashes
(merge computes them row by row as it stores them), `push` grafts a leaf or a
whole perfect subtree. On the way it keeps the compact range and head at the
`marks` sizes (checkpoint sizes) and, when asked, every perfect subtree of
2^SUBTREE_LEVEL leaves or more. Stdlib only: the parallel verifier's worker
script imports it as a sibling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

GENESIS_PREV = bytes(32)
"""The previous hash of the genesis record (seq 0): 32 zero bytes."""
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256
BLOCK_BITS = 12
"""Leaves are merged in aligned runs of up to 2^BLOCK_BITS at a time."""
SUBTREE_LEVEL = 8
"""Perfect subtrees of 2^SUBTREE_LEVEL leaves and more are what `subtrees` records
(the ledger's `tree` table): any proof then needs at most two blocks of leaves."""


def link_hash(prev: bytes, body: bytes) -> bytes:
    """A record's hash: H(prev hash ‖ stored bytes)."""
    return hashlib.sha256(prev + body).digest()


def leaf_hash(body: bytes) -> bytes:
    """A record's Merkle leaf: H(0x00 ‖ stored bytes)."""
    return hashlib.sha256(b"\x00" + body).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def continues(row: Sequence[Any], at: int, head: bytes) -> bool:
    """The link rule. A stored row in PER column order (seq, time_ns, kind, job_id,
    body, prev_hash, hash, ...) continues a chain that stands at size `at` after
    the record hashed `head` when its seq is `at`, its stored prev hash is `head`
    and its hash is H(head ‖ body). Both halves matter: the prev column can be
    edited alone, and a rewritten record can carry a hash that is right for its
    own bytes. A column of the wrong type continues nothing. `Chain.accept`
    (`sparkctl verify`, sequential and parallel) and the head node's merge (per
    row, inside the store's INSERT) decide with this function; `Chain.link`
    writes rows that satisfy it."""
    try:
        ok: bool = row[0] == at and row[5] == head \
            and _sha256(head + row[4]).digest() == row[6]
    except TypeError:
        return False
    return ok


def fold(hashes: Sequence[bytes]) -> bytes:
    """Root over perfect subtree hashes listed largest (leftmost) first."""
    if not hashes:
        return EMPTY_ROOT
    r = hashes[-1]
    for h in reversed(hashes[:-1]):
        r = hashlib.sha256(b"\x01" + h + r).digest()
    return r


class Chain:
    """Chain head and Merkle compact range after the records [base, size).

    `base` is 0 for a whole ledger; a verifier's worker starts a detached chain
    at an aligned chunk (`base` a multiple of the chunk size, `head` the stored
    hash of record base-1) whose compact range covers only its own records.
    Set `marks` to the sizes whose (compact range, head) should be kept in
    `marked` (checkpoint sizes: `root_at` gives the root), and `subtrees` to a
    list to collect (level, index, hash) of every perfect subtree of at least
    2^SUBTREE_LEVEL leaves as it completes (the ledger's `tree` table, the head
    store's proof cache).
    """

    __slots__ = ("base", "hashes", "head", "marked", "marks", "size", "subtrees")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = (),
                 head: bytes = GENESIS_PREV, *, base: int = 0) -> None:
        self.base = base
        self.size = size
        self.head = head
        self.hashes = list(hashes)
        if len(self.hashes) != bin(size - base).count("1"):
            raise ValueError(f"a compact range of {size - base} leaves needs "
                             f"{bin(size - base).count('1')} hashes, not {len(self.hashes)}")
        self.marks: frozenset[int] | set[int] = frozenset()
        self.marked: dict[int, tuple[list[bytes], bytes]] = {}
        self.subtrees: list[tuple[int, int, bytes]] | None = None

    @classmethod
    def from_bytes(cls, size: int, frontier: bytes, head: bytes = GENESIS_PREV) -> Chain:
        """A chain resumed from a saved frontier (`state.frontier`) and head hash."""
        if len(frontier) % 32:
            raise ValueError(f"a saved frontier is 32-byte hashes, not {len(frontier)} bytes")
        return cls(size, [frontier[i:i + 32] for i in range(0, len(frontier), 32)], head)

    def to_bytes(self) -> bytes:
        """The compact range as `state.frontier` stores it."""
        return b"".join(self.hashes)

    def copy(self) -> Chain:
        """Same position, own list (marks, marked and subtrees are not carried)."""
        return Chain(self.size, self.hashes, self.head, base=self.base)

    def root(self) -> bytes:
        """Merkle tree head over [base, size)."""
        return fold(self.hashes)

    def root_at(self, size: int) -> bytes | None:
        """The tree head at a mark passed on the way (None when none was kept there)."""
        kept = self.marked.get(size)
        return None if kept is None else fold(kept[0])

    def head_at(self, size: int) -> bytes | None:
        """The hash of record size - 1 at a mark passed on the way (None when none)."""
        kept = self.marked.get(size)
        return None if kept is None else kept[1]

    def levels(self) -> list[int]:
        """The height of each compact-range hash, largest first."""
        n = self.size - self.base
        return [k for k in range(n.bit_length() - 1, -1, -1) if n >> k & 1]

    def push(self, subtree: bytes, level: int = 0) -> None:
        """Graft a leaf hash (level 0) or the root of a perfect subtree of 2^level
        leaves; the chain's own size must be a multiple of 2^level. Subtrees formed
        by the merge are recorded (not the grafted one: its maker recorded it)."""
        n = self.size - self.base
        if n & ((1 << level) - 1):
            raise ValueError(f"a subtree of 2^{level} leaves cannot follow {n} leaves")
        h, fh, subs, at = subtree, self.hashes, self.subtrees, self.size
        n >>= level
        top = level
        while n & 1:
            h = hashlib.sha256(b"\x01" + fh.pop() + h).digest()
            n >>= 1
            top += 1
            if subs is not None and top >= SUBTREE_LEVEL:
                subs.append((top, at >> top, h))
        fh.append(h)
        self.size += 1 << level

    def link(self, bodies: Iterable[bytes]) -> list[bytes]:
        """Append records with these stored bytes (the writer); returns their hashes."""
        sha = hashlib.sha256
        data = list(bodies)
        head = self.head
        out: list[bytes] = []
        for body in data:
            head = sha(head + body).digest()
            out.append(head)
        self._grow([sha(b"\x00" + b).digest() for b in data], out)
        return out

    def accept(self, rows: Sequence[Sequence[Any]]) -> int:
        """Take stored rows (PER column order: seq, time_ns, kind, job_id, body,
        prev_hash, hash, ...) while each `continues` the chain. Returns how many
        were taken; the chain then stands after the last of them."""
        taken = self._continuing(rows)
        if taken:
            sha = hashlib.sha256
            part = rows if taken == len(rows) else rows[:taken]
            self._grow([sha(b"\x00" + r[4]).digest() for r in part], [r[6] for r in part])
        return taken

    def _continuing(self, rows: Sequence[Sequence[Any]]) -> int:
        """How many leading rows continue the chain (the state does not move)."""
        size, head = self.size, self.head
        for i, r in enumerate(rows):
            if not continues(r, size, head):
                return i
            head, size = r[6], size + 1
        return len(rows)

    def add_leaves(self, leaves: Sequence[bytes], hashes: Sequence[bytes] | None = None
                   ) -> None:
        """Merge the leaf hashes of the next records, in order, into the compact range.
        With `hashes` (those records' hashes, already checked to continue the chain:
        merge checks each row as the store copies it) the head moves too and the
        marks on the way are kept; without, the head stays (a tree rebuilt from
        stored bytes alone) and no mark may fall among these leaves."""
        if hashes is None:
            if any(self.size < m <= self.size + len(leaves) for m in self.marks):
                raise ValueError("a mark's head is unknown without the records' hashes")
            self._leaves(leaves)
            return
        if len(hashes) != len(leaves):
            raise ValueError(f"{len(leaves)} leaves but {len(hashes)} record hashes")
        self._grow(leaves, hashes)

    def _grow(self, leaves: Sequence[bytes], hashes: Sequence[bytes]) -> None:
        """Add records (leaf hashes and record hashes, continuing the chain) to the
        tree, keeping the compact range and head at each size in `marks` on the way."""
        start, end = self.size, self.size + len(leaves)
        cuts = sorted(m - start for m in self.marks if start < m <= end) if self.marks else []
        if not cuts:
            if leaves:
                self._leaves(leaves)
                self.head = hashes[-1]
            return
        done = 0
        for cut in [*cuts, len(leaves)]:
            if cut > done:
                self._leaves(leaves[done:cut])
                self.head = hashes[cut - 1]
                done = cut
            if cut in cuts:
                self.marked[self.size] = (list(self.hashes), self.head)

    def _leaves(self, leaves: Sequence[bytes]) -> None:
        """Merge leaf hashes into the compact range: each aligned run of 2^k leaves
        (k <= BLOCK_BITS) is hashed level by level in list comprehensions, then
        grafted whole; the perfect subtrees it forms are recorded on the way."""
        sha = hashlib.sha256
        i, n = 0, len(leaves)
        while i < n:
            local = self.size - self.base
            k = min(BLOCK_BITS, (n - i).bit_length() - 1,
                    (local & -local).bit_length() - 1 if local else BLOCK_BITS)
            if k == 0:
                self.push(leaves[i])
                i += 1
                continue
            level = list(leaves[i:i + (1 << k)])
            subs, at = self.subtrees, self.size
            for height in range(1, k + 1):
                level = [sha(b"\x01" + a + b).digest()
                         for a, b in zip(level[0::2], level[1::2], strict=True)]
                if subs is not None and height >= SUBTREE_LEVEL:
                    first = at >> height
                    subs.extend((height, first + j, h) for j, h in enumerate(level))
            self.push(level[0], k)
            i += 1 << k
