"""StoredTree's consistency proof: the same hashes the all-leaves proof gives, from
stored subtrees, reading at most a few blocks of leaves however long the tree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spark_slurm.ledger.chain import SUBTREE_LEVEL, Chain
from spark_slurm.ledger.merkle import consistency_proof, leaf_hash, root, verify_consistency
from spark_slurm.ledger.tree import StoredTree

N = 2600
LEAVES = [leaf_hash(b"record %d" % i) for i in range(N)]


def _stored() -> dict[tuple[int, int], bytes]:
    chain = Chain()
    chain.subtrees = []
    chain.add_leaves(LEAVES)
    return {(lvl, idx): h for lvl, idx, h in chain.subtrees}


STORED = _stored()


def tree(size: int, read: list[int] | None = None) -> StoredTree:
    def leaves(lo: int, hi: int) -> list[bytes]:
        if read is not None:
            read.append(hi - lo)
        return LEAVES[lo:min(hi, size)]

    return StoredTree(size, leaves, lambda lvl, idx: STORED.get((lvl, idx)))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, N).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_the_proof_is_rfc_6962s_and_verifies(sizes: tuple[int, int]) -> None:
    size, old = sizes
    read: list[int] = []
    proof = tree(size, read).consistency_proof(old)
    assert proof == consistency_proof(LEAVES[:size], old)
    assert verify_consistency(old, size, root(LEAVES[:old]), root(LEAVES[:size]), proof)
    # stored subtrees answer all but the ragged edges: a handful of leaf blocks
    assert sum(read) <= 4 << SUBTREE_LEVEL, (size, old, read)


@pytest.mark.parametrize(("old", "size"), [(1, 2), (255, 256), (256, 257), (256, 512),
                                           (1000, 2048), (2047, 2600), (7, 2600)])
def test_edges_and_a_wrong_old_root(old: int, size: int) -> None:
    proof = tree(size).consistency_proof(old)
    assert verify_consistency(old, size, root(LEAVES[:old]), root(LEAVES[:size]), proof)
    other = root([*LEAVES[:old - 1], leaf_hash(b"rewritten")])
    assert not verify_consistency(old, size, other, root(LEAVES[:size]), proof)
    if proof:
        bent = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
        assert not verify_consistency(old, size, root(LEAVES[:old]), root(LEAVES[:size]),
                                      bent)


def test_sizes_outside_the_tree_are_refused() -> None:
    assert tree(10).consistency_proof(0) == [] and tree(10).consistency_proof(10) == []
    for bad in (-1, 11):
        with pytest.raises(ValueError, match=r"outside 0\.\.10"):
            tree(10).consistency_proof(bad)
