"""The compact range merge keeps per node agrees with `ledger.merkle` byte for byte."""

from __future__ import annotations

import pytest

from spark_slurm.head.frontier import BLOCK, BLOCK_LEVEL, NodeFrontier
from spark_slurm.ledger.merkle import Frontier, leaf_hash, root


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@pytest.mark.parametrize("cuts", [[1100], [1, 2, 3, 1094], [255, 1, 512, 332], [700, 400],
                                  [4096 + 3, 5000 - 4099]])
def test_roots_and_compact_range_match_the_ledger_merkle(cuts: list[int]) -> None:
    """Added in batches that start anywhere, the range is the ledger's own Frontier and
    every asked-for root is the root of that prefix."""
    leaves = _leaves(sum(cuts))
    marks = {1, 2, 3, 7, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1099, sum(cuts)}
    frontier = NodeFrontier()
    at = 0
    for cut in cuts:
        frontier.add(leaves[at:at + cut], marks)
        at += cut
        reference = Frontier()
        for leaf in leaves[:at]:
            reference.append(leaf)
        assert frontier.hashes == reference.hashes and frontier.size == at
        assert frontier.root() == root(leaves[:at])
    for size, value in frontier.roots.items():
        assert value == root(leaves[:size]), size
    assert set(frontier.roots) == {m for m in marks if m <= at}


def test_subtrees_are_every_completed_perfect_subtree_of_a_block_or_more() -> None:
    leaves = _leaves(5 * BLOCK + 17)
    frontier = NodeFrontier()
    for chunk in (100, 3 * BLOCK, 2 * BLOCK + 17 - 100):
        frontier.add(leaves[:chunk] if not frontier.size else
                     leaves[frontier.size:frontier.size + chunk])
    assert frontier.size == len(leaves)
    expected = {(level, i) for level in range(BLOCK_LEVEL, 12)
                for i in range(len(leaves) >> level)}
    got = {(lv, i): h for lv, i, h in frontier.subtrees}
    assert set(got) == expected
    for (level, i), value in got.items():
        assert value == root(leaves[i << level:(i + 1) << level])


def test_a_stored_range_resumes_where_it_stopped() -> None:
    leaves = _leaves(3000)
    first = NodeFrontier()
    first.add(leaves[:1234])
    resumed = NodeFrontier.from_bytes(1234, first.to_bytes())
    resumed.add(leaves[1234:], {2048, 3000})
    assert resumed.root() == root(leaves) and resumed.roots[2048] == root(leaves[:2048])
    with pytest.raises(ValueError, match="needs"):
        NodeFrontier.from_bytes(1235, first.to_bytes())
