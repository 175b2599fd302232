"""Whole-ledger hashing in bulk for merge: Merkle levels and a per-epoch HMAC.

Merge needs the root of many prefixes of one node's leaves (every checkpoint)
and the hash of every complete `BLOCK` of leaves (the audit proof cache). A
`Frontier` walk or a `root()` per block costs a Python call per interior node;
hashing each tree level in one list comprehension costs a fraction of that and
gives every aligned perfect subtree at once, from which any prefix root is a
fold of at most log n of them (RFC 6962's split at the largest power of two).
Tests check both against `spark_slurm.ledger.merkle` byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from spark_slurm.ledger.merkle import EMPTY_ROOT, node_hash


class MerkleLevels:
    """levels[k][i] is the hash of the perfect subtree over leaves [i*2^k, (i+1)*2^k)."""

    __slots__ = ("levels",)

    def __init__(self, leaves: Sequence[bytes]) -> None:
        sha = hashlib.sha256
        cur = list(leaves)
        self.levels = [cur]
        while len(cur) > 1:
            pairs = zip(cur[0::2], cur[1::2], strict=False)  # an odd last one waits a level
            cur = [sha(b"\x01" + a + b).digest() for a, b in pairs]
            self.levels.append(cur)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def level(self, k: int) -> list[bytes]:
        """The hashes of every complete aligned subtree of 2^k leaves."""
        return self.levels[k] if k < len(self.levels) else []

    def root(self, size: int) -> bytes:
        """MTH of the first `size` leaves (size <= number of leaves)."""
        if not 0 <= size <= self.size:
            raise ValueError(f"prefix of {size} leaves outside a tree of {self.size}")
        if size == 0:
            return EMPTY_ROOT
        parts = []
        offset = 0
        for k in range(size.bit_length() - 1, -1, -1):
            if size >> k & 1:
                parts.append(self.levels[k][offset >> k])
                offset += 1 << k
        value = parts[-1]
        for part in reversed(parts[:-1]):
            value = node_hash(part, value)
        return value


def leaf_hashes(bodies: Sequence[bytes]) -> list[bytes]:
    """`merkle.leaf_hash` of each body, in one comprehension."""
    sha = hashlib.sha256
    return [sha(b"\x00" + body).digest() for body in bodies]
