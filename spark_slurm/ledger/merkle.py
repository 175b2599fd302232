"""RFC 6962 Merkle tree over the ledger's stored bytes: roots and proofs.

Leaf = SHA-256(0x00 ‖ data), node = SHA-256(0x01 ‖ left ‖ right); a tree of n
leaves splits at the largest power of two below n. Proofs are lists of 32-byte
hashes in RFC 9162 order; the verifiers return False for any malformed or
non-matching proof rather than raising, so callers can report "proof invalid".
"""

from __future__ import annotations

from collections.abc import Sequence

from spark_slurm.ledger.chain import EMPTY_ROOT, GENESIS_PREV, Chain, leaf_hash, node_hash

__all__ = ["EMPTY_ROOT", "Frontier", "consistency_proof", "inclusion_proof", "leaf_hash",
           "node_hash", "root", "root_from_inclusion", "verify_consistency", "verify_inclusion"]


def _split(n: int) -> int:
    """Largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle tree head of the given leaf hashes (iterative, O(n))."""
    chain = Chain()
    for h in leaf_hashes:
        chain.push(h)
    return chain.root()


def _subtree(leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    return root(leaf_hashes[lo:hi])


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for leaf `index` in the tree of all given leaves."""
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} outside tree of size {n}")
    proof: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            proof.append(_subtree(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_subtree(leaf_hashes, lo, lo + k))
            lo = lo + k
    proof.reverse()
    return proof


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof that the first `old_size` leaves' tree is a prefix of the whole tree."""
    n = len(leaf_hashes)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} outside 0..{n}")
    if old_size in (0, n):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, n, old_size, True
    while m != hi:
        k = _split(hi - lo)
        if m - lo <= k:
            proof.append(_subtree(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            proof.append(_subtree(leaf_hashes, lo, lo + k))
            lo = lo + k
            complete = False
    if not complete:
        proof.append(_subtree(leaf_hashes, lo, hi))
    proof.reverse()
    return proof


def _valid(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == 32 for h in hashes)


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """Root implied by an inclusion proof, or None when the proof is malformed."""
    if not 0 <= index < size or not _valid(leaf, *proof):
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     expected_root: bytes) -> bool:
    """True when `proof` shows leaf hash `leaf` at `index` in the tree with that root."""
    got = root_from_inclusion(index, size, leaf, proof)
    return got is not None and got == expected_root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """True when `proof` shows the old tree is a prefix of the new one (RFC 9162 2.1.4.2)."""
    if not 0 <= old_size <= new_size or not _valid(*proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class Frontier(Chain):
    """A `Chain` fed leaf hashes rather than records (`append(leaf)`), for code that
    holds leaves; the compact range and its merge are Chain's."""

    __slots__ = ()

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = (),
                 head: bytes = GENESIS_PREV) -> None:
        super().__init__(size, hashes, head)

    def append(self, leaf: bytes) -> None:
        self.push(leaf)
