"""Checking an evidence bundle offline: signatures, statement, proofs, policy snapshot.

The order is fixed (and `contrib/verify-evidence.sh` follows it) so both name
the same first failure: keys and pins, the issuer's statement, each checkpoint
(node signature, witness cosignature), each record (present, leaf as stated,
envelope columns, chain hash, inclusion proof to the checkpoint root), rows
the statement does not name, then the policy snapshots and the decisions that
cite them. Nothing here trusts the bundle's own claims without a signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spark_slurm.errors import CheckpointError, EvidenceInvalid
from spark_slurm.evidence.bundle import (
    Bundle,
    BundleKey,
    Statement,
    StatementCheckpoint,
    key_raw,
    parse_statement,
    read_bundle,
)
from spark_slurm.ledger.chain import link_hash
from spark_slurm.ledger.checkpoint import note_key_hash, parse_checkpoint, signatures
from spark_slurm.ledger.keys import public_raw, signing_key_id
from spark_slurm.ledger.merkle import leaf_hash, verify_inclusion
from spark_slurm.ledger.records import envelope_suffix


@dataclass(frozen=True, slots=True)
class Pins:
    """Keys the verifier holds from elsewhere; bundle keys must match them."""

    witness: Ed25519PublicKey | None = None
    issuer: Ed25519PublicKey | None = None
    nodes: Sequence[Ed25519PublicKey] = ()


@dataclass(frozen=True, slots=True)
class EvidenceReport:
    """The outcome: ok, or the first part that failed and why."""

    path: str
    job_id: str
    records: int
    nodes: list[str]
    keys: dict[str, str] = field(default_factory=dict)  # name -> "role key-id"
    pinned: list[str] = field(default_factory=list)
    failed_part: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.failed_part is None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "job_id": self.job_id,
                "records": self.records, "nodes": self.nodes, "keys": self.keys,
                "pinned": self.pinned, "failed": self.failed_part, "reason": self.reason}


def note_signed(text: str, name: str, key: Ed25519PublicKey) -> str:
    """"ok" when a signature line by (name, key) verifies over the note's body,
    "missing" when no line carries that name and key hash, "bad" otherwise."""
    body = text.split("\n\n", 1)[0] + "\n"
    want = note_key_hash(name, key)
    found = [sig for n, h, sig in signatures(text) if n == name and h == want]
    for sig in found:
        try:
            key.verify(sig, body.encode())
            return "ok"
        except InvalidSignature:
            continue
    return "bad" if found else "missing"


def _kid(key: Ed25519PublicKey) -> str:
    return signing_key_id(public_raw(key))


class _Check:
    def __init__(self, bundle: Bundle, pins: Pins) -> None:
        self.b = bundle
        self.pins = pins
        self.keys: dict[str, tuple[BundleKey, Ed25519PublicKey]] = {}
        self.statement: Statement | None = None
        self.cps: dict[str, StatementCheckpoint] = {}

    def key(self, name: str, part: str, what: str) -> Ed25519PublicKey:
        found = self.keys.get(name)
        if found is None:
            raise EvidenceInvalid(part, f"the bundle holds no {what} key named {name!r}")
        return found[1]

    def run(self) -> None:
        self._keys()
        self._statement()
        self._checkpoints()
        self._records()
        self._policies()

    def _keys(self) -> None:
        for k in self.b.keys:
            self.keys[k.name] = (k, Ed25519PublicKey.from_public_bytes(key_raw(k)))
        for role, pin in (("witness", self.pins.witness), ("issuer", self.pins.issuer)):
            name = self.b.meta.get(role, "")
            if pin is None:
                continue
            have = self.key(name, f"key {name}", role)
            if public_raw(have) != public_raw(pin):
                raise EvidenceInvalid(f"key {name}", f"the {role} key {_kid(have)} is not the "
                                      f"pinned {role} key {_kid(pin)}")
        if self.pins.nodes:
            wanted = {public_raw(p) for p in self.pins.nodes}
            for k, public in self.keys.values():
                if k.role == "node" and public_raw(public) not in wanted:
                    raise EvidenceInvalid(f"key {k.name}", f"node key {_kid(public)} is not "
                                          "one of the pinned node keys")

    def _statement(self) -> None:
        name = self.b.meta.get("issuer", "")
        issuer = self.key(name, "statement", "issuer")
        verdict = _signed(self.b.statement, name, issuer, "statement")
        if verdict == "missing":
            raise EvidenceInvalid("statement", f"carries no signature by the issuer key "
                                  f"{name} ({_kid(issuer)})")
        if verdict == "bad":
            raise EvidenceInvalid("statement", f"the issuer signature by {name} does not "
                                  "verify (statement edited)")
        st = parse_statement(self.b.statement)
        if st.job_id != self.b.job_id:
            raise EvidenceInvalid("statement", f"names job {st.job_id}, the bundle says "
                                  f"{self.b.job_id}")
        self.statement = st

    def _checkpoints(self) -> None:
        assert self.statement is not None
        witness_name = self.b.meta.get("witness", "")
        for sc in self.statement.checkpoints:
            part = f"checkpoint {sc.node}"
            text = self.b.checkpoints.get(sc.node)
            if text is None:
                raise EvidenceInvalid(part, "named by the statement but missing")
            try:
                cp = parse_checkpoint(text)
            except CheckpointError as exc:
                raise EvidenceInvalid(part, exc.message) from None
            if (cp.origin, cp.size, base64.b64encode(cp.root).decode()) != (
                    sc.origin, sc.size, sc.root_b64):
                raise EvidenceInvalid(part, "origin, size or root differs from the statement "
                                      "(checkpoint text edited)")
            node_key = self.key(cp.origin, part, "node")
            if self.keys[cp.origin][0].node != sc.node:
                raise EvidenceInvalid(part, f"key {cp.origin} is not node {sc.node}'s key")
            verdict = _signed(text, cp.origin, node_key, part)
            if verdict != "ok":
                raise EvidenceInvalid(part, "node signature does not verify (signature or "
                                      "checkpoint text edited)" if verdict == "bad" else
                                      f"no node signature by key {cp.origin} "
                                      f"({_kid(node_key)}): wrong or replaced key")
            witness = self.key(witness_name, part, "witness")
            verdict = _signed(text, witness_name, witness, part)
            if verdict != "ok":
                raise EvidenceInvalid(part, "witness cosignature does not verify (cosignature "
                                      "or checkpoint text edited)" if verdict == "bad" else
                                      f"no witness cosignature by {witness_name} "
                                      f"({_kid(witness)})")
            self.cps[sc.node] = sc
        for node in sorted(set(self.b.checkpoints) - set(self.cps)):
            raise EvidenceInvalid(f"checkpoint {node}", "not named by the statement")

    def _records(self) -> None:
        assert self.statement is not None
        rows = {(r.node, r.seq): r for r in self.b.records}
        named = set()
        for node, seq, leaf in self.statement.records:
            part = f"record {node}/{seq}"
            named.add((node, seq))
            r = rows.get((node, seq))
            if r is None:
                raise EvidenceInvalid(part, "named by the statement but missing from the "
                                      "bundle (dropped)")
            own = leaf_hash(r.body)
            if own.hex() != leaf:
                raise EvidenceInvalid(part, "stored bytes differ from the statement "
                                      "(PER body edited)")
            suffix = envelope_suffix(r.seq, r.time_ns, r.kind, r.job_id)
            if not (r.body.startswith(b'{"body":') and r.body.endswith(suffix)):
                raise EvidenceInvalid(part, "seq/time/kind/job columns do not match the "
                                      "hashed bytes")
            if link_hash(r.prev_hash, r.body) != r.hash:
                raise EvidenceInvalid(part, "hash is not SHA-256(prev_hash || body)")
            sc = self.cps.get(node)
            if sc is None:
                raise EvidenceInvalid(part, "no checkpoint of its node in the statement")
            if seq >= sc.size:
                raise EvidenceInvalid(part, f"not covered by the checkpoint (size {sc.size})")
            if not verify_inclusion(own, seq, sc.size, self.b.proofs.get((node, seq), []),
                                    base64.b64decode(sc.root_b64)):
                raise EvidenceInvalid(part, "inclusion proof does not lead to the checkpoint "
                                      "root (proof edited)")
        for node, seq in sorted(set(rows) - named):
            raise EvidenceInvalid(f"record {node}/{seq}", "not named by the statement")
        for node, seq in sorted(set(self.b.proofs) - named):
            raise EvidenceInvalid(f"proof {node}/{seq}", "belongs to no record of the "
                                  "statement")

    def _policies(self) -> None:
        assert self.statement is not None
        proven: dict[str, set[str]] = {}
        bodies = [(r, _body(r.body)) for r in self.b.records]
        for r, body in bodies:
            if r.kind == "policy":
                proven.setdefault(str(body.get("sha256")), set()).add(str(body.get("text")))
        named = set(self.statement.policies)
        for sha in self.statement.policies:
            part = f"policy {sha[:16]}"
            text = self.b.policies.get(sha)
            if text is None:
                raise EvidenceInvalid(part, "named by the statement but missing")
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != sha:
                raise EvidenceInvalid(part, "text does not hash to its sha256 (policy "
                                      "snapshot edited)")
            if text not in proven.get(sha, set()):
                raise EvidenceInvalid(part, "matches no policy record in the bundle")
        for sha in sorted(set(self.b.policies) - named):
            raise EvidenceInvalid(f"policy {sha[:16]}", "not named by the statement")
        for r, body in bodies:
            decision = body.get("decision")
            cited = decision.get("policy_sha256") if isinstance(decision, dict) else None
            if isinstance(cited, str) and cited and cited not in named:
                raise EvidenceInvalid(f"record {r.node}/{r.seq}", f"its decision cites policy "
                                      f"{cited[:16]}, which the bundle does not hold")


def _signed(text: str, name: str, key: Ed25519PublicKey, part: str) -> str:
    try:
        return note_signed(text, name, key)
    except CheckpointError as exc:
        raise EvidenceInvalid(part, exc.message) from None


def _body(stored: bytes) -> dict[str, Any]:
    try:
        body = json.loads(stored)["body"]
    except (ValueError, KeyError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def check_bundle(bundle: Bundle, pins: Pins = Pins()) -> None:
    """Raise EvidenceInvalid naming the first part of the bundle that does not hold."""
    _Check(bundle, pins).run()


def verify_bundle(path: Path, pins: Pins = Pins()) -> EvidenceReport:
    """Read and check a bundle file (EvidenceError when it is no bundle at all)."""
    bundle = read_bundle(path)
    check = _Check(bundle, pins)
    failed: EvidenceInvalid | None = None
    try:
        check.run()
    except EvidenceInvalid as exc:
        failed = exc
    keys = {name: f"{k.role} {_kid(public)}" for name, (k, public) in check.keys.items()}
    pinned = [role for role, pin in (("witness", pins.witness), ("issuer", pins.issuer))
              if pin is not None] + (["nodes"] if pins.nodes else [])
    return EvidenceReport(
        path=str(path), job_id=bundle.job_id, records=len(bundle.records),
        nodes=sorted(bundle.checkpoints), keys=keys, pinned=pinned,
        failed_part=failed.part if failed else None,
        reason=failed.reason if failed else None)
