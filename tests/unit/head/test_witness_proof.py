"""The witness's consistency proofs read from a node ledger's stored subtrees.

A node ledger keeps the hash of every aligned 256-leaf subtree, so a proof costs
O(log n) reads; these tests check such proofs are the RFC 6962 proofs the records'
own bytes give, that a damaged subtree table is not mistaken for a rewritten
history, and that a rewritten history is still a FORK.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import WitnessError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.witness import proof_from_ledger, witness_checkpoint
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.merkle import consistency_proof, leaf_hash
from tests.unit.head.builders import make_keys


class Node:
    """One node ledger written record by record, its signed checkpoint at any size."""

    def __init__(self, root: Path) -> None:
        self.clock = ManualClock()
        self.trust = root / "trust"
        self.keys = make_keys(root, "n1", self.trust)
        self.path = root / "n1.db"

    def write(self, path: Path, count: int, tag: str) -> str:
        """Append `count` records to the ledger at `path`; the checkpoint at its new size."""
        with Ledger.open(path, self.keys.hmac, self.keys.signing, node="n1", cluster="spark",
                         clock=self.clock) as led:
            led.append_many(("admission", {"v": 1, "node": "n1", "job_id": f"{tag}{i}"})
                            for i in range(count))
            return led.checkpoint().text


def all_leaves(path: Path) -> list[bytes]:
    with sqlite3.connect(path) as conn:
        return [leaf_hash(bytes(b)) for (b,) in
                conn.execute("SELECT CAST(body AS BLOB) FROM per ORDER BY seq")]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_a_proof_from_stored_subtrees_is_the_proof_of_the_records(node: Node) -> None:
    node.write(node.path, 1300, "a")
    leaves = all_leaves(node.path)
    for old, new in [(1, 2), (256, 512), (300, 1301), (511, 1024), (777, 1290), (1024, 1301)]:
        expected = consistency_proof(leaves[:new], old)
        assert proof_from_ledger(node.path, old, new) == expected, (old, new)
        assert proof_from_ledger(node.path, old, new, stored=False) == expected, (old, new)
    with pytest.raises(WitnessError, match="holds 1301 records, checkpoint claims 1400"):
        proof_from_ledger(node.path, 10, 1400)


def test_a_damaged_subtree_table_is_not_taken_for_a_fork(
        node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "w"
    keys = KeyRing.load(node.trust)
    first = witness_checkpoint(state, node.write(node.path, 600, "a"), keys)
    newer = node.write(node.path, 700, "b")
    damaged = tmp_path / "damaged.db"
    with sqlite3.connect(node.path) as src, sqlite3.connect(damaged) as dst:
        src.backup(dst)
        # a subtree the proof from the witnessed size needs: records 768..1023
        assert dst.execute("UPDATE tree SET hash = zeroblob(32) WHERE level = 8 AND idx = 3"
                           ).rowcount == 1
    new_size = first.size + 700
    assert proof_from_ledger(damaged, first.size, new_size) != \
        proof_from_ledger(node.path, first.size, new_size)
    with caplog.at_level(logging.WARNING, logger="spark_slurm.head.witness"):
        result = witness_checkpoint(state, newer, keys, ledger=damaged)
    assert result.status == "accepted" and result.previous_size == first.size
    assert result.size == new_size
    assert "stored Merkle subtrees disagree with the records" in caplog.text
    assert str(damaged) in caplog.text


def test_a_rewritten_history_is_a_fork_by_the_records_too(node: Node, tmp_path: Path) -> None:
    """The node signs a checkpoint over another history after the witness saw one:
    neither the stored subtrees nor the records' bytes give a proof that holds."""
    state = tmp_path / "w"
    keys = KeyRing.load(node.trust)
    node.write(node.path, 300, "a")
    before = tmp_path / "before.db"
    with sqlite3.connect(node.path) as src, sqlite3.connect(before) as dst:
        src.backup(dst)
    witness_checkpoint(state, node.write(node.path, 400, "b"), keys)
    rewritten = node.write(before, 900, "x")  # the same first 301, then other records
    with pytest.raises(WitnessError, match="FORK"):
        witness_checkpoint(state, rewritten, keys, ledger=before)
