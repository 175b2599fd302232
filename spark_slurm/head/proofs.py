"""Per-record verification on the merged ledger: chain link, hash, inclusion proof,
and (given the node's HMAC K[0]) the record's epoch MAC.

Inclusion proofs are built from the leaf hashes the merge stored, plus the hash
of every perfect subtree of 2^SUBTREE_LEVEL leaves or more it completed, by the
ledger's own `StoredTree` (the node ledger answers proofs the same way). Any
subtree the RFC 6962 recursion asks for is then stored or spans fewer than
2^SUBTREE_LEVEL leaves, so a proof costs O(2^SUBTREE_LEVEL + log n) hashes
instead of O(n) and `audit` stays fast however long a node's chain grows.
Proofs are checked with the ledger's own `verify_inclusion`, links with
`chain.continues`; nothing here decides validity by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.store import ClusterReads
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.chain import GENESIS_PREV, continues, link_hash
from spark_slurm.ledger.keys import hmac_key_id
from spark_slurm.ledger.merkle import leaf_hash, verify_inclusion
from spark_slurm.ledger.records import Record, envelope_suffix
from spark_slurm.ledger.tree import StoredTree

__all__ = ["MerkleProver", "Prover", "Verification", "node_tree", "verify_records"]


@dataclass(frozen=True, slots=True)
class Verification:
    """How one record checked out: `chain` is "ok" or why not; `proof` is "ok",
    "failed", or "uncovered" (newer than the latest checkpoint, chain-verified only);
    `mac` is "ok", "unchecked" (no HMAC key given for the node) or why not."""

    chain: str
    proof: str
    checkpoint_size: int | None
    mac: str = "unchecked"

    @property
    def ok(self) -> bool:
        return self.chain == "ok" and self.proof in ("ok", "uncovered") \
            and self.mac in ("ok", "unchecked")


def node_tree(db: ClusterReads, node_id: int, size: int) -> StoredTree:
    """The RFC 6962 tree over a node's first `size` stored leaves: the ledger's own
    `StoredTree`, reading the perfect subtrees of 2^SUBTREE_LEVEL leaves or more
    that merge kept (`Chain.subtrees`) and the leaves from the cluster store. A
    proof thus reads O(log n) stored hashes plus at most two blocks of leaves; a
    subtree whose leaves are not all there raises ValueError."""
    return StoredTree(size, lambda lo, hi: db.leaves(node_id, lo, hi - lo),
                      lambda level, index: db.subtree(node_id, level, index))


class Prover(Protocol):
    """Proves a record is covered by a signed (or witnessed) checkpoint of its node:
    returns the proof status ("ok", "failed", "uncovered") and the checkpoint size."""

    def prove(self, rec: Record) -> tuple[str, int | None]: ...


class MerkleProver:
    """An RFC 6962 inclusion proof against the largest checkpoint held for the node
    that covers only merged records (witnessed wins a tie)."""

    def __init__(self, db: ClusterReads) -> None:
        self.db = db
        self._trees: dict[str, tuple[StoredTree, bytes] | None] = {}

    def prove(self, rec: Record) -> tuple[str, int | None]:
        if rec.node not in self._trees:
            state = self.db.node(rec.node)
            cp = self.db.latest_checkpoint(state.node_id, state.next_seq) \
                if state is not None else None
            self._trees[rec.node] = None if cp is None or state is None else (
                node_tree(self.db, state.node_id, cp.size), bytes.fromhex(cp.root))
        held = self._trees[rec.node]
        if held is None or rec.seq >= held[0].size:
            return "uncovered", held[0].size if held is not None else None
        tree, cp_root = held
        try:
            path = tree.inclusion_proof(rec.seq)
        except ValueError:  # leaves the proof needs are gone (a record deleted)
            return "failed", tree.size
        good = verify_inclusion(leaf_hash(rec.body_bytes), rec.seq, tree.size, path, cp_root)
        return ("ok" if good else "failed"), tree.size


def verify_records(db: ClusterReads, records: list[Record], keys: KeyRing | None = None,
                   prover: Prover | None = None) -> dict[tuple[str, int], Verification]:
    """Verify each record's link and hash, and prove it against its node's checkpoint
    (`prover`, by default an RFC 6962 inclusion proof); with `keys`, also re-check the
    MAC of every record whose node has an HMAC key."""
    out: dict[tuple[str, int], Verification] = {}
    epoch_keys: dict[str, NodeMacKey | None] = {}
    prover = prover if prover is not None else MerkleProver(db)
    for rec in records:
        state = db.node(rec.node)
        if state is None:
            out[(rec.node, rec.seq)] = Verification("node unknown", "failed", None)
            continue
        chain = _chain_status(db, state.node_id, rec)
        proof, size = prover.prove(rec)
        if rec.node not in epoch_keys:
            k0 = keys.hmac(rec.node) if keys is not None else None
            epoch_keys[rec.node] = NodeMacKey(hmac_key_id(k0), hmac_epochs.EpochKeys(k0)) \
                if k0 is not None else None
        out[(rec.node, rec.seq)] = Verification(chain, proof, size,
                                                mac_status(rec, epoch_keys[rec.node]))
    return out


@dataclass(frozen=True, slots=True)
class NodeMacKey:
    """A node's HMAC key id and its epoch keys, derived from K[0] as needed."""

    key_id: str
    epochs: hmac_epochs.EpochKeys


def mac_status(rec: Record, key: NodeMacKey | None) -> str:
    """"ok" when the record's MAC is HMAC(K[epoch of its key id], hash); without a
    key "unchecked"; otherwise what is wrong. A node with an HMAC key MACs every
    record, so a missing MAC is a failure, not a pass."""
    if key is None:
        return "unchecked"
    if rec.mac is None or rec.key_id is None:
        return "MAC missing"
    parsed = hmac_epochs.parse_key_id(rec.key_id)
    if parsed is None:
        return f"key id {rec.key_id!r} is not <id>:<epoch>"
    if parsed[0] != key.key_id:
        return f"MAC made with key {parsed[0]}, not the given key {key.key_id}"
    if not hmac_epochs.reachable(parsed[1], rec.seq):
        return f"key id names epoch {parsed[1]}, past any a record at seq {rec.seq} can be in"
    expected = hmac_epochs.mac(key.epochs.key(parsed[1]), bytes.fromhex(rec.hash))
    return "ok" if expected.hex() == rec.mac else "MAC mismatch"


def _chain_status(db: ClusterReads, node_id: int, rec: Record) -> str:
    try:
        prev, value = bytes.fromhex(rec.prev_hash), bytes.fromhex(rec.hash)
    except ValueError:
        return "hash mismatch"
    if link_hash(prev, rec.body_bytes) != value:
        return "hash mismatch"
    if not rec.body_bytes.endswith(envelope_suffix(rec.seq, rec.time_ns, rec.kind, rec.job_id)):
        return "columns differ from the hashed record"
    head = GENESIS_PREV if rec.seq == 0 else db.hash_at(node_id, rec.seq - 1)
    if head is None:  # a retention cut keeps the hash it cut at
        return f"previous record {rec.seq - 1} missing"
    row = (rec.seq, rec.time_ns, rec.kind, rec.job_id, rec.body_bytes, prev, value)
    if continues(row, rec.seq, head):
        return "ok"
    return "genesis does not start the chain" if rec.seq == 0 else \
        f"does not link to seq {rec.seq - 1}"
