"""A node's RFC 6962 Merkle compact range as merge grows it, a batch of leaves at a time.

The head node stores each node's compact range (one perfect-subtree hash per
set bit of the tree size, largest first: the ledger's `state.frontier` form),
so the next merge extends the tree from there and checks the roots of new
checkpoints without reading any older leaf. On the way it hands out the hash of
every completed perfect subtree of `BLOCK` leaves or more (the audit proof
cache: a proof then reads O(log n) stored hashes) and the root at each size
asked for (checkpoint sizes). Leaves are hashed up in aligned runs,
one list comprehension per tree level, which costs a fraction of a Python call
per interior node; tests check every root against `ledger.merkle`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

from spark_slurm.ledger.merkle import EMPTY_ROOT

BLOCK_LEVEL = 8
BLOCK = 1 << BLOCK_LEVEL
MAX_RUN_LEVEL = 12  # runs of up to 4096 leaves are hashed level by level at once


class NodeFrontier:
    """Compact range of the first `size` leaves of one node's tree."""

    __slots__ = ("hashes", "roots", "size", "subtrees")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a compact range of {size} leaves needs "
                             f"{bin(size).count('1')} hashes, not {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)
        self.subtrees: list[tuple[int, int, bytes]] = []
        """(level, index, hash) of every perfect subtree of 2^level >= BLOCK leaves that
        `add` completed: the one over leaves [index * 2^level, (index + 1) * 2^level)."""
        self.roots: dict[int, bytes] = {}
        """size -> root at that size, for each mark passed by `add`."""

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> NodeFrontier:
        if len(data) % 32:
            raise ValueError(f"a stored compact range is 32-byte hashes, not {len(data)} bytes")
        return cls(size, [data[i:i + 32] for i in range(0, len(data), 32)])

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        sha = hashlib.sha256
        value = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            value = sha(b"\x01" + h + value).digest()
        return value

    def add(self, leaves: Sequence[bytes], marks: Collection[int] = ()) -> None:
        """Append leaf hashes; the root at every size in `marks` on the way is kept in
        `roots`, and every completed subtree of BLOCK leaves or more in `subtrees`."""
        sha = hashlib.sha256
        i, n = 0, len(leaves)
        ahead = sorted(m for m in marks if self.size < m <= self.size + n)
        while i < n:
            size = self.size
            limit = (ahead[0] if ahead else size + n - i) - size
            k = min(MAX_RUN_LEVEL, limit.bit_length() - 1,
                    (size & -size).bit_length() - 1 if size else MAX_RUN_LEVEL)
            run = leaves[i:i + (1 << k)]
            level = list(run)
            for height in range(1, k + 1):
                level = [sha(b"\x01" + a + b).digest()
                         for a, b in zip(level[0::2], level[1::2], strict=True)]
                if height >= BLOCK_LEVEL:
                    first = size >> height
                    self.subtrees.extend((height, first + j, h) for j, h in enumerate(level))
            self._graft(level[0], k)
            i += 1 << k
            if ahead and self.size == ahead[0]:
                self.roots[self.size] = self.root()
                ahead.pop(0)

    def _graft(self, subtree: bytes, level: int) -> None:
        """Append the root of a perfect subtree of 2^level leaves (size aligned to it)."""
        sha = hashlib.sha256
        h, n, height = subtree, self.size >> level, level
        end = self.size + (1 << level)
        while n & 1:
            h = sha(b"\x01" + self.hashes.pop() + h).digest()
            n >>= 1
            height += 1
            if height >= BLOCK_LEVEL:
                self.subtrees.append((height, (end >> height) - 1, h))
        self.hashes.append(h)
        self.size = end
