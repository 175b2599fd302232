"""RFC 6962 Merkle tree: published known-answer values and corrupted proofs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spark_slurm.ledger import merkle

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "data" / "ledger" / "rfc6962-vectors.json").read_text())
LEAVES = [merkle.leaf_hash(bytes.fromhex(x)) for x in VECTORS["leaves_hex"]]
ROOTS = {int(k): bytes.fromhex(v) for k, v in VECTORS["roots_by_size"].items()}


def test_leaf_hashes_match_published_values() -> None:
    assert [h.hex() for h in LEAVES] == VECTORS["leaf_hashes"]


def test_empty_tree_root() -> None:
    assert merkle.root([]).hex() == VECTORS["empty_root"]


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_published_values(size: int) -> None:
    assert merkle.root(LEAVES[:size]) == ROOTS[size]


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: f"{c['index']}of{c['size']}")
def test_inclusion_proofs_match_published_values(case: dict[str, Any]) -> None:
    proof = merkle.inclusion_proof(LEAVES[:case["size"]], case["index"])
    assert [p.hex() for p in proof] == case["proof"]
    assert merkle.verify_inclusion(LEAVES[case["index"]], case["index"], case["size"], proof,
                                   ROOTS[case["size"]])


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: f"{c['old']}to{c['new']}")
def test_consistency_proofs_match_published_values(case: dict[str, Any]) -> None:
    proof = merkle.consistency_proof(LEAVES[:case["new"]], case["old"])
    assert [p.hex() for p in proof] == case["proof"]
    assert merkle.verify_consistency(case["old"], case["new"], ROOTS[case["old"]],
                                     ROOTS[case["new"]], proof)


def test_frontier_persists_and_matches_full_recompute() -> None:
    frontier = merkle.Frontier()
    for i, leaf in enumerate(LEAVES, 1):
        frontier.append(leaf)
        again = merkle.Frontier.from_bytes(frontier.size, frontier.to_bytes())
        assert again.root() == ROOTS[i]


def test_frontier_rejects_wrong_number_of_hashes() -> None:
    with pytest.raises(ValueError, match="needs 2 hashes"):
        merkle.Frontier(3, [bytes(32)])


def _mutations(proof: list[bytes]) -> list[tuple[str, list[bytes]]]:
    """Every single-element change: flipped bit, replaced, removed, added."""
    out = []
    for i in range(len(proof)):
        for bit in (0, 7, 100, 255):
            flipped = bytearray(proof[i])
            flipped[bit // 8] ^= 1 << (bit % 8)
            out.append((f"flip {i}:{bit}", [*proof[:i], bytes(flipped), *proof[i + 1:]]))
        out.append((f"replace {i}", [*proof[:i], bytes(32), *proof[i + 1:]]))
        out.append((f"remove {i}", proof[:i] + proof[i + 1:]))
        out.append((f"short {i}", [*proof[:i], proof[i][:31], *proof[i + 1:]]))
    for i in range(len(proof) + 1):
        out.append((f"add {i}", [*proof[:i], bytes(range(32)), *proof[i:]]))
    return out


@given(st.integers(min_value=2, max_value=70), st.data())
def test_inclusion_proof_with_any_single_change_fails(n: int, data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    tree_root = merkle.root(leaves)
    proof = merkle.inclusion_proof(leaves, index)
    assert merkle.verify_inclusion(leaves[index], index, n, proof, tree_root)
    for label, bad in _mutations(proof):
        assert not merkle.verify_inclusion(leaves[index], index, n, bad, tree_root), label
    assert not merkle.verify_inclusion(leaves[index], (index + 1) % n, n, proof, tree_root)
    assert not merkle.verify_inclusion(leaves[index], index, n * 2, proof, tree_root)
    other = merkle.leaf_hash(b"not a leaf")
    assert not merkle.verify_inclusion(other, index, n, proof, tree_root)


@given(st.integers(min_value=2, max_value=70), st.data())
def test_consistency_proof_with_any_single_change_fails(n: int, data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    old = data.draw(st.integers(min_value=1, max_value=n - 1))
    old_root, new_root = merkle.root(leaves[:old]), merkle.root(leaves)
    proof = merkle.consistency_proof(leaves, old)
    assert merkle.verify_consistency(old, n, old_root, new_root, proof)
    for label, bad in _mutations(proof):
        assert not merkle.verify_consistency(old, n, old_root, new_root, bad), label
    assert not merkle.verify_consistency(old, n, new_root, old_root, proof)
    assert not merkle.verify_consistency(old + 1, n, old_root, new_root, proof)
    assert not merkle.verify_consistency(old, n * 2, old_root, new_root, proof)


def test_consistency_edge_cases() -> None:
    r1 = merkle.root(LEAVES[:1])
    assert merkle.verify_consistency(0, 1, merkle.EMPTY_ROOT, r1, [])
    assert not merkle.verify_consistency(0, 1, merkle.EMPTY_ROOT, r1, [r1])
    assert merkle.verify_consistency(1, 1, r1, r1, [])
    assert not merkle.verify_consistency(1, 1, r1, ROOTS[2], [])
    assert not merkle.verify_consistency(2, 1, ROOTS[2], r1, [])
    assert not merkle.verify_consistency(1, 2, r1, ROOTS[2], [])


def test_proof_requests_outside_the_tree_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        merkle.inclusion_proof(LEAVES, 8)
    with pytest.raises(ValueError, match="outside"):
        merkle.consistency_proof(LEAVES, 9)
