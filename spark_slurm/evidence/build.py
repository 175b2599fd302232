"""`sparkctl evidence JOBID`: a job's PERs and their proofs, in one checkable file.

The records are what `sparkctl audit` shows for the job (its own PERs, the node
events that touched its GPUs, the facility follow-ups) plus the `policy` record
in force at each decision. Each is proven by an RFC 6962 inclusion proof against
its node's latest checkpoint that the witness cosigned, computed with the head
node's own proof code. The issuer (by default the witness key) signs a statement
listing everything, so nothing can be dropped unseen. The bundle is verified
before it replaces FILE: a bundle that would not check is never written.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import CheckpointError, EvidenceError, EvidenceInvalid, SparkError
from spark_slurm.evidence.bundle import (
    FORMAT,
    VERSION,
    Bundle,
    BundleKey,
    BundleRecord,
    StatementCheckpoint,
    sign_note,
    statement_body,
    write_bundle,
)
from spark_slurm.evidence.verify import Pins, check_bundle, note_signed
from spark_slurm.head.audit import build_report, open_reads
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.node_view import NodeLedgerView
from spark_slurm.head.proofs import node_tree
from spark_slurm.head.store import ClusterReads, body_of
from spark_slurm.head.witness import KEY_FILE, NAME_FILE, PUB_FILE, witnessed
from spark_slurm.ledger.checkpoint import Checkpoint, parse_checkpoint, signatures
from spark_slurm.ledger.keys import load_public_key, load_signing_key, public_b64, public_from_raw
from spark_slurm.ledger.merkle import leaf_hash


@dataclass(frozen=True, slots=True)
class Witnessed:
    """The witness's public key and name, and the checkpoints it cosigned by origin."""

    name: str
    public: Ed25519PublicKey
    checkpoints: dict[str, str]


@dataclass(frozen=True, slots=True)
class Signer:
    """Who signs the bundle's statement; `name` None: derived from the key."""

    key: Ed25519PrivateKey
    name: str | None = None


@dataclass(frozen=True, slots=True)
class EvidenceSummary:
    path: str
    job_id: str
    source: str
    records: int
    checkpoints: dict[str, int]
    issuer: str
    witness: str
    kinds: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "job_id": self.job_id, "source": self.source,
                "records": self.records, "checkpoints": self.checkpoints,
                "issuer": self.issuer, "witness": self.witness, "kinds": self.kinds}


def witness_from_state(state: Path) -> tuple[Witnessed, Signer]:
    """A head node's witness state: its key pair, name and cosigned checkpoints."""
    if not (state / PUB_FILE).exists():
        raise EvidenceError(f"{state}: not a witness state directory (no {PUB_FILE})")
    name = (state / NAME_FILE).read_text().strip() if (state / NAME_FILE).exists() \
        else "witness"
    public = load_public_key(state / PUB_FILE)
    texts = {cp.origin: cp.text for cp in witnessed(state)}
    return Witnessed(name, public, texts), Signer(load_signing_key(state / KEY_FILE), name)


def witness_from_files(files: Sequence[Path], witness_pub: Path) -> Witnessed:
    """Cosigned checkpoint notes kept as files, and the witness public key (PEM)."""
    public = load_public_key(witness_pub)
    texts: dict[str, str] = {}
    name = None
    for path in files:
        try:
            cp = parse_checkpoint(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise EvidenceError(f"{path}: cannot read checkpoint: {exc}") from None
        except CheckpointError as exc:
            raise EvidenceError(f"{path}: {exc.message}") from None
        names = [n for n, _, _ in signatures(cp.text) if note_signed(cp.text, n, public) == "ok"]
        if not names:
            raise EvidenceError(f"{path}: carries no valid signature by the witness key "
                                f"{witness_pub}")
        name = names[0]
        texts[cp.origin] = cp.text
    if name is None:
        raise EvidenceError("no cosigned checkpoint given (--checkpoint FILE)")
    return Witnessed(name, public, texts)


@contextlib.contextmanager
def _source(db: str | Path, keys: KeyRing | None) -> Iterator[tuple[ClusterReads, str]]:
    with open_reads(db, keys) as (src, source):
        if isinstance(src, NodeLedgerView):  # a node ledger: it must verify as a whole
            from spark_slurm.ledger.verify import verify_ledger  # noqa: PLC0415

            problem = src.identity_problem()
            report = verify_ledger(src.path)
            if problem is not None or not report.ok:
                why = f"{problem.code} seq {problem.seq}: {problem.detail}" if problem \
                    else report.summary()
                raise EvidenceError(f"{db}: ledger does not verify ({why}); no evidence can "
                                    "be made from it")
        yield src, source


def _node_keys(src: ClusterReads, node: str, keys: KeyRing | None) -> list[Ed25519PublicKey]:
    """Keys the node has signed with: the head's trust store, the genesis, rotations."""
    out = [k for k in [keys.public(node) if keys is not None else None] if k is not None]
    for rec in src.records_of_kind(["genesis", "key"], node):
        body = body_of(rec)
        raw = body.get("signing_public_key") if rec.kind == "genesis" else (
            body.get("public_key") if body.get("event") == "rotate" else None)
        if isinstance(raw, str):
            with contextlib.suppress(ValueError, SparkError):
                out.append(public_from_raw(base64.b64decode(raw, validate=True)))
    return out


def _proven(src: ClusterReads, node: str, seqs: list[int], cp: Checkpoint
            ) -> dict[tuple[str, int], list[bytes]]:
    state = src.node(node)
    assert state is not None
    if max(seqs) >= cp.size:
        raise EvidenceError(f"node {node}: the job's record seq {max(seqs)} is newer than the "
                            f"cosigned checkpoint (size {cp.size}); witness a newer checkpoint "
                            "first (sparkctl witness)")
    if state.next_seq < cp.size:
        raise EvidenceError(f"node {node}: the ledger holds {state.next_seq} records, the cosigned "
                            f"checkpoint covers {cp.size}")
    tree = node_tree(src, state.node_id, cp.size)
    try:
        if tree.root() != cp.root:
            raise EvidenceError(f"node {node}: the ledger's first {cp.size} records do not "
                                "match the cosigned checkpoint (a different or forked ledger)")
        return {(node, s): tree.inclusion_proof(s) for s in seqs}
    except ValueError as exc:  # the store lacks leaves the tree needs
        raise EvidenceError(f"node {node}: {exc} (records missing from the ledger)") from None


def _assemble(src: ClusterReads, source: str, job_id: str, *, wit: Witnessed, signer: Signer,
              keys: KeyRing | None, now: int) -> Bundle:
    report = build_report(src, job_id)
    wanted = {(e.node, e.seq) for e in report.timeline}
    for e in report.timeline:  # the policy in force at each decision
        decision = e.body.get("decision")
        if isinstance(decision, dict) and decision.get("policy_sha256"):
            policy = src.record_before(e.node, e.seq, "policy")
            if policy is not None:
                wanted.add((policy.node, policy.seq))
    records = []
    for node, seq in sorted(wanted):
        state = src.node(node)
        rec = src.record(state.node_id, seq) if state is not None else None
        if rec is None:
            raise EvidenceError(f"node {node}: record {seq} is not held")
        records.append(BundleRecord(node, rec.seq, rec.time_ns, rec.kind, rec.job_id,
                                    rec.body_bytes, bytes.fromhex(rec.prev_hash),
                                    bytes.fromhex(rec.hash),
                                    None if rec.mac is None else bytes.fromhex(rec.mac),
                                    rec.key_id))
    proofs: dict[tuple[str, int], list[bytes]] = {}
    bundle_keys = [BundleKey(wit.name, "witness", None, public_b64(wit.public))]
    cps: list[StatementCheckpoint] = []
    texts: dict[str, str] = {}
    for node in sorted({n for n, _ in wanted}):
        state = src.node(node)
        origin = state.origin if state is not None and state.origin else None
        text = wit.checkpoints.get(origin or "")
        if origin is None or text is None:
            raise EvidenceError(f"node {node}: no checkpoint of {origin or node} cosigned by "
                                f"{wit.name}; run `sparkctl witness` for it first")
        cp = parse_checkpoint(text)
        if note_signed(text, wit.name, wit.public) != "ok":
            raise EvidenceError(f"node {node}: checkpoint is not cosigned by {wit.name}")
        signer_key = next((k for k in _node_keys(src, node, keys)
                           if note_signed(text, origin, k) == "ok"), None)
        if signer_key is None:
            raise EvidenceError(f"node {node}: the cosigned checkpoint is not signed by any "
                                "key the ledger or the trust store (--keys) names")
        proofs.update(_proven(src, node, [s for n, s in wanted if n == node], cp))
        bundle_keys.append(BundleKey(origin, "node", node, public_b64(signer_key)))
        cps.append(StatementCheckpoint(node, origin, cp.size, cp.text.split("\n")[2]))
        texts[node] = text
    policies = {}
    for r in records:
        if r.kind == "policy":
            body = json.loads(r.body)["body"]
            policies[str(body["sha256"])] = str(body["text"])
    issuer = _issuer_name(signer, wit, bundle_keys)
    if issuer not in {k.name for k in bundle_keys}:
        bundle_keys.append(BundleKey(issuer, "issuer", None,
                                     public_b64(signer.key.public_key())))
    body_text = statement_body(job_id, now, cps,
                               [(r.node, r.seq, leaf_hash(r.body).hex()) for r in records],
                               sorted(policies))
    meta = {"format": FORMAT, "version": str(VERSION), "job_id": job_id,
            "created_ns": str(now), "source": source, "issuer": issuer, "witness": wit.name}
    return Bundle(meta, records, proofs, texts, bundle_keys, policies,
                  sign_note(body_text, issuer, signer.key))


def _issuer_name(signer: Signer, wit: Witnessed, keys: list[BundleKey]) -> str:
    if signer.name is not None:
        return signer.name
    b64 = public_b64(signer.key.public_key())
    for k in keys:
        if k.public_b64 == b64:
            return k.name
    raise EvidenceError("the signing key is neither the witness key nor a node key of the "
                        "job: name it (--sign-name)")


def make_evidence(db: str | Path, job_id: str, out: Path, *, witness: Witnessed, signer: Signer,
                  keys_dir: Path | None = None, clock: Clock = SYSTEM_CLOCK
                  ) -> EvidenceSummary:
    """Write the job's evidence bundle to `out` (replaced atomically, after verifying)."""
    keys = KeyRing.load(keys_dir) if keys_dir is not None else None
    with _source(db, keys) as (src, source):
        bundle = _assemble(src, source, job_id, wit=witness, signer=signer, keys=keys,
                           now=clock.now_ns())
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        write_bundle(tmp, bundle)
        try:
            check_bundle(bundle, Pins(witness=witness.public,
                                      issuer=signer.key.public_key()))
        except EvidenceInvalid as exc:  # a bug, never a user's input: say so plainly
            raise EvidenceError(f"the bundle made for job {job_id} does not verify "
                                f"({exc.message}); nothing written") from None
        os.replace(tmp, out)
    except OSError as exc:
        raise EvidenceError(f"{out}: cannot write bundle: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    kinds: dict[str, int] = {}
    for r in bundle.records:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return EvidenceSummary(str(out), job_id, source, len(bundle.records),
                           {n: int(c.split("\n")[1]) for n, c in bundle.checkpoints.items()},
                           bundle.meta["issuer"], witness.name, kinds)

