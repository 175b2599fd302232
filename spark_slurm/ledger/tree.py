"""Merkle roots, inclusion and consistency proofs from stored subtrees, without the whole tree.

Schema 2 keeps the hash of every aligned perfect subtree of at least
2^SUBTREE_LEVEL leaves in the `tree` table (the writer records each as it
completes). Any subtree the RFC 6962 recursion asks for is then one stored row,
or a split of it, or fewer than 2^SUBTREE_LEVEL leaves hashed from the records'
stored bytes, so an inclusion proof costs O(log n) row reads and at most two
blocks of leaves, however long the ledger. `StoredTree` takes the two lookups
as functions, so any store that keeps the same subtrees (a node ledger here)
can answer proofs the same way; proofs are checked with `merkle.verify_inclusion`
and `merkle.verify_consistency`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from spark_slurm.ledger.chain import SUBTREE_LEVEL, Chain, node_hash
from spark_slurm.ledger.merkle import leaf_hash

Leaves = Callable[[int, int], list[bytes]]
"""leaf hashes of the records [lo, hi)"""
Stored = Callable[[int, int], bytes | None]
"""stored hash of the perfect subtree (level, index), or None when not kept"""


class StoredTree:
    """The RFC 6962 tree over the first `size` leaves of one ledger."""

    def __init__(self, size: int, leaves: Leaves, stored: Stored) -> None:
        self.size = size
        self._leaves = leaves
        self._stored = stored
        self._memo: dict[tuple[int, int], bytes] = {}

    def subtree(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi) (0 <= lo < hi <= size)."""
        key = (lo, hi)
        got = self._memo.get(key)
        if got is not None:
            return got
        n = hi - lo
        level = n.bit_length() - 1
        value = None
        if n == 1 << level and level >= SUBTREE_LEVEL and lo % n == 0:
            value = self._stored(level, lo >> level)
        if value is None:
            if n <= 1 << SUBTREE_LEVEL:
                chain = Chain()
                for leaf in self._leaves(lo, hi):
                    chain.push(leaf)
                if chain.size != n:
                    raise ValueError(f"leaves {lo}..{hi - 1} are not all stored")
                value = chain.root()
            else:
                k = 1 << ((n - 1).bit_length() - 1)
                value = node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))
        self._memo[key] = value
        return value

    def root(self) -> bytes:
        """Tree head at `size`."""
        if self.size == 0:
            return Chain().root()
        return self.subtree(0, self.size)

    def inclusion_proof(self, index: int) -> list[bytes]:
        """Audit path for one leaf, in the order `merkle.verify_inclusion` expects."""
        if not 0 <= index < self.size:
            raise ValueError(f"leaf index {index} outside tree of size {self.size}")
        proof: list[bytes] = []
        lo, hi = 0, self.size
        while hi - lo > 1:
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if index - lo < k:
                proof.append(self.subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self.subtree(lo, lo + k))
                lo = lo + k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """Proof that the tree of the first `old_size` leaves is a prefix of this one
        (RFC 6962 SUBPROOF, in the order `merkle.verify_consistency` expects): at most
        about 2 log2(size) subtrees, each a stored row or a short split of one, so a
        node answers the witness without hashing its history."""
        if not 0 <= old_size <= self.size:
            raise ValueError(f"old size {old_size} outside 0..{self.size}")
        if old_size in (0, self.size):
            return []
        proof: list[bytes] = []
        lo, hi, complete = 0, self.size, True
        while old_size != hi:
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if old_size - lo <= k:
                proof.append(self.subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self.subtree(lo, lo + k))
                lo += k
                complete = False
        if not complete:
            proof.append(self.subtree(lo, hi))
        proof.reverse()
        return proof


def ledger_tree(conn: sqlite3.Connection, size: int, *, stored: bool = True) -> StoredTree:
    """The tree over a node ledger's first `size` records (`stored=False` for a
    schema-1 file, which keeps no subtrees: every subtree is then hashed from
    the records' bytes)."""
    def leaves(lo: int, hi: int) -> list[bytes]:
        rows = conn.execute("SELECT CAST(body AS BLOB) FROM per WHERE seq >= ? AND seq < ? "
                            "ORDER BY seq", (lo, hi)).fetchall()
        return [leaf_hash(bytes(b)) for (b,) in rows]

    def subtree(level: int, idx: int) -> bytes | None:
        if not stored:
            return None
        row = conn.execute("SELECT hash FROM tree WHERE level = ? AND idx = ?",
                           (level, idx)).fetchone()
        return None if row is None else bytes(row[0])

    return StoredTree(size, leaves, subtree)
