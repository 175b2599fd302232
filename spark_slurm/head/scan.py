"""Checking one node ledger record by record, naming what is wrong with a fixed code.

The scan walks the rows in seq order and stops at the first record it cannot
trust: everything after it hangs off a broken link. Each problem gets the code
an operator can act on (GAP, REORDER, DUPLICATE, TAMPERED, FOREIGN_ORIGIN,
UNKNOWN_KEY, EPOCH_GAP) with the node and seq. Hashes, MACs, envelopes, Merkle
leaves and checkpoint signatures are checked with the ledger package's own
functions, so the head node and `sparkctl verify` cannot disagree on a byte.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography.exceptions import InvalidSignature

from spark_slurm.errors import CheckpointError, CheckpointInvalid, LedgerKeyError
from spark_slurm.head.bulk import MerkleLevels, leaf_hashes
from spark_slurm.head.headdb import Finding, StoredRecord
from spark_slurm.head.keyring import KeyRing
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.checkpoint import Checkpoint, origin_for, verify_checkpoint
from spark_slurm.ledger.keys import hmac_key_id, public_from_raw, signing_key_id
from spark_slurm.ledger.merkle import leaf_hash
from spark_slurm.ledger.records import GENESIS_PREV, envelope_suffix, record_hash
from spark_slurm.ledger.store import rotation_message

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

REF_TAG = b'"ref":'


class RawRecord(NamedTuple):
    """A node ledger row exactly as stored (hashes and MAC as raw bytes).

    A named tuple rather than a dataclass: merge builds one per row read, and
    `_make` over the SQLite row costs a fraction of a dataclass constructor."""

    seq: int
    time_ns: int
    kind: str
    job_id: str | None
    body: bytes
    prev_hash: bytes
    hash: bytes
    mac: bytes | None
    key_id: str | None

    def ref_seq(self) -> int | None:
        """The seq a follow-up record points back to (indexed for audit)."""
        return ref_seq_of(self.body)

    def row(self, leaf: bytes | None = None) -> tuple[Any, ...]:
        return (self.seq, self.time_ns, self.kind, self.job_id, self.body, self.prev_hash,
                self.hash, self.mac, self.key_id, self.ref_seq(),
                leaf if leaf is not None else leaf_hash(self.body))

    def as_stored(self, node: str) -> StoredRecord:
        return StoredRecord(node, self.seq, self.time_ns, self.kind, self.job_id, self.body,
                            self.prev_hash.hex(), self.hash.hex(),
                            None if self.mac is None else self.mac.hex(), self.key_id)


def ref_seq_of(body: bytes) -> int | None:
    """`body.ref.seq` of a stored envelope when it is an integer SQLite can hold; merge
    calls it from SQL too, so both ways of copying rows index the same value."""
    if REF_TAG not in body:
        return None
    try:
        ref = json.loads(body)["body"].get("ref")
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    seq = ref.get("seq") if isinstance(ref, dict) else None
    return seq if isinstance(seq, int) and -2**63 <= seq < 2**63 else None


@dataclass
class NodeScan:
    """The verified prefix of a node ledger and everything found wrong with it."""

    node: str | None
    origin: str | None = None
    findings: list[Finding] = field(default_factory=list)
    good: list[RawRecord] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    valid_checkpoints: list[Checkpoint] = field(default_factory=list)
    mergeable: bool = True
    hashes: list[bytes] = field(default_factory=list)
    """The hash of each record in `good`: all merge needs of them once they are checked."""
    _tree: MerkleLevels | None = field(default=None, repr=False)

    def tree(self) -> MerkleLevels:
        """Every aligned subtree over `leaves`, hashed once for all checkpoints and blocks."""
        if self._tree is None or self._tree.size != len(self.leaves):
            self._tree = MerkleLevels(self.leaves)
        return self._tree


def _envelope_seq(body: bytes) -> int | None:
    """The seq the hashed envelope names (it ends `"seq":N,"time_ns":T}`)."""
    at = body.rfind(b',"seq":')
    if at < 0:
        return None
    digits = body[at + 7:].split(b",", 1)[0]
    return int(digits) if digits.isdigit() else None


def _body(rec: RawRecord) -> dict[str, Any]:
    try:
        body = json.loads(rec.body)["body"]
    except (ValueError, KeyError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def scan_node(records: Sequence[RawRecord], checkpoints: Sequence[str], keys: KeyRing | None,
              expected_node: str | None, fallback_name: str, *, fast: bool = True) -> NodeScan:
    """Verify a node ledger's rows and checkpoints; see the module docstring.

    `fast=False` sends every record through the full checks (tests compare the two)."""
    if not records or records[0].seq != 0 or records[0].kind != "genesis":
        name = expected_node or fallback_name
        scan = NodeScan(node=name, mergeable=False)
        first = records[0].seq if records else 0
        scan.findings.append(Finding("GAP", name, 0, "ledger does not start with its genesis "
                                     f"record (first seq is {first})" if records else
                                     "ledger holds no records"))
        return scan
    genesis = _body(records[0])
    node = str(genesis.get("node", fallback_name))
    scan = NodeScan(node=node, origin=origin_for(str(genesis.get("cluster", "spark")), node)
                    if genesis.get("node") else None)
    if expected_node is not None and node != expected_node:
        scan.node = expected_node
        scan.mergeable = False
        scan.findings.append(Finding("FOREIGN_ORIGIN", expected_node, 0,
                                     f"ledger belongs to node {node!r}, collected as "
                                     f"{expected_node!r}"))
        return scan
    public = k0 = None
    if keys is not None:
        try:
            public, k0 = keys.public(node), keys.hmac(node)
        except LedgerKeyError as exc:
            scan.findings.append(Finding("UNKNOWN_KEY", node, None, exc.message))
            scan.mergeable = False
            return scan
        problem = None
        if public is None and k0 is None:
            problem = f"no key for node {node!r} in {keys.directory}"
        elif public is not None and genesis.get("signing_key_id") != signing_key_id(public):
            problem = (f"genesis names signing key {genesis.get('signing_key_id')}, the head "
                       f"node trusts {signing_key_id(public)}")
        elif k0 is not None and genesis.get("hmac_key_id") != hmac_key_id(k0):
            problem = (f"genesis names HMAC key {genesis.get('hmac_key_id')}, the head node "
                       f"holds {hmac_key_id(k0)}")
        if problem:
            scan.findings.append(Finding("UNKNOWN_KEY", node, 0 if "genesis" in problem
                                         else None, problem))
            scan.mergeable = False
            return scan
    elif isinstance(genesis.get("signing_public_key"), str):
        public = public_from_raw(base64.b64decode(genesis["signing_public_key"]))
    signers = [public] if public is not None else []
    _scan_chain(scan, node, records, k0, signers, fast=fast)
    _scan_checkpoints(scan, node, checkpoints, signers, records[-1].seq + 1)
    scan.hashes = [r.hash for r in scan.good]
    return scan


def _scan_chain(scan: NodeScan, node: str, records: Sequence[RawRecord], k0: bytes | None,
                signers: list[Ed25519PublicKey], *, fast: bool = True) -> None:
    """Accept records while they check out; stop at the first that does not.

    A record like the one before it (next seq, links to it, hashes right, columns
    match the envelope, names the node, MAC'd under the same key id, not a key
    event) is accepted by the inline test; anything else takes `_check` and
    `_check_mac` exactly as written, so findings do not depend on the fast path.
    The inline test skips the DUPLICATE lookup: a record whose hash verifies and
    whose envelope names its own seq cannot repeat an earlier hash short of a
    SHA-256 collision, so only the slow path needs `seen` (filled in on demand)."""
    epochs = hmac_epochs.EpochKeys(k0) if k0 is not None else None
    hid = hmac_key_id(k0) if k0 is not None else None
    node_tag = b'"node":' + json.dumps(node, ensure_ascii=False).encode()
    good = scan.good
    seen: dict[bytes, int] = {}
    later_index: list[dict[bytes, int]] = []

    def later() -> dict[bytes, int]:
        """hash -> seq over the whole file, built the first time a check needs it."""
        if not later_index:
            later_index.append({r.hash: r.seq for r in records})
        return later_index[0]
    prev, last_seq, last_epoch = GENESIS_PREV, -1, 0
    last: RawRecord | None = None
    mac_kid: str | None = None  # key id the inline test accepts, and its MAC
    mac_of: Callable[[bytes], bytes] | None = None
    sha = hashlib.sha256
    suffix = _suffix
    for rec in records:
        seq, _t, kind, _job, body, prev_hash, rec_hash, mac, key_id = rec
        if (fast and seq == last_seq + 1 and prev_hash == prev and kind != "key"
                and sha(prev_hash + body).digest() == rec_hash and body.endswith(suffix(rec))
                and (seq == 0 or node_tag in body)
                and (epochs is None or (key_id == mac_kid and mac is not None
                                        and mac_of is not None and mac_of(rec_hash) == mac))):
            good.append(rec)
            prev, last_seq, last = rec_hash, seq, rec
            continue
        if len(seen) < len(good):
            seen.update((r.hash, r.seq) for r in good[len(seen):])
        code, seq, why = _check(rec, prev, last_seq, seen, later=later, node_tag=node_tag)
        if code is None and epochs is not None:
            code, why, last_epoch = _check_mac(rec, epochs, hid, last_epoch, last)
            seq = rec.seq
            if code is None and key_id != mac_kid:
                mac_kid, mac_of = key_id, hmac_epochs.mac_function(epochs.key(last_epoch))
        if code is None and rec.kind == "key" and signers:
            body_obj = _body(rec)
            if body_obj.get("event") == "rotate":
                code, why = follow_rotation(body_obj, scan.origin or "", signers)
        if code is not None:
            scan.findings.append(Finding(code, node, seq, why))
            break
        good.append(rec)
        seen[rec.hash] = rec.seq
        prev, last_seq, last = rec.hash, rec.seq, rec
    scan.leaves = leaf_hashes([r.body for r in good])


_KIND_JSON: dict[str, bytes] = {}


_NO_SUFFIX = b"\x00"  # no envelope ends with it: a column of the wrong type never matches


def _suffix(rec: RawRecord) -> bytes:
    """`envelope_suffix` with the kind's JSON cached: it runs once per record. A
    column rewritten with another type (a BLOB kind, a TEXT time) gives `_NO_SUFFIX`."""
    kind = _KIND_JSON.get(rec.kind)
    if kind is None:
        if type(rec.kind) is not str:
            return _NO_SUFFIX
        if len(_KIND_JSON) > 256:
            _KIND_JSON.clear()
        kind = _KIND_JSON.setdefault(rec.kind, json.dumps(rec.kind).encode())
    job = rec.job_id
    if type(rec.time_ns) is not int or type(rec.seq) is not int or not (
            job is None or type(job) is str):
        return _NO_SUFFIX
    if job is None:
        return b',"job":null,"kind":%b,"seq":%d,"time_ns":%d}' % (kind, rec.seq, rec.time_ns)
    if job.isascii() and job.isprintable() and '"' not in job and "\\" not in job:
        return b',"job":"%b","kind":%b,"seq":%d,"time_ns":%d}' % (
            job.encode(), kind, rec.seq, rec.time_ns)
    return envelope_suffix(rec.seq, rec.time_ns, rec.kind, rec.job_id)


def _check(rec: RawRecord, prev: bytes, last_seq: int, seen: dict[bytes, int], *,
           later: Callable[[], dict[bytes, int]], node_tag: bytes) -> tuple[str | None, int, str]:
    if rec.seq <= last_seq:
        return "REORDER", rec.seq, f"seq {rec.seq} appears after seq {last_seq}"
    if rec.seq > last_seq + 1:
        return "GAP", last_seq + 1, f"seqs {last_seq + 1}..{rec.seq - 1} are missing"
    if type(rec.kind) is not str or not (rec.job_id is None or type(rec.job_id) is str):
        return "TAMPERED", rec.seq, "a column has the wrong type"  # as `sparkctl verify`
    if rec.hash in seen:
        return "DUPLICATE", rec.seq, f"repeats the record of seq {seen[rec.hash]}"
    if record_hash(rec.prev_hash, rec.body) != rec.hash:
        return "TAMPERED", rec.seq, "stored bytes do not hash to the stored hash"
    if not rec.body.endswith(_suffix(rec)):
        env_seq = _envelope_seq(rec.body)
        if env_seq is None or env_seq == rec.seq:
            return "TAMPERED", rec.seq, "seq/time/kind/job columns differ from the hashed record"
        if later().get(rec.prev_hash, -1) >= rec.seq:
            return "REORDER", rec.seq, (f"holds the record of seq {env_seq}, which links to "
                                        "a record stored after it")
        if env_seq == rec.seq - 1:
            return "TAMPERED", rec.seq - 1, (f"a record was inserted at seq {rec.seq - 1} "
                                             "(later records renumbered)")
        if env_seq == rec.seq + 1:
            return "GAP", rec.seq, (f"the record of seq {rec.seq} was deleted "
                                    "(later records renumbered)")
        return "REORDER", rec.seq, f"holds the record of seq {env_seq}"
    if rec.prev_hash != prev:
        if rec.prev_hash in seen or rec.prev_hash in later():
            return "REORDER", rec.seq, f"links to seq {later().get(rec.prev_hash)}, " \
                                       f"not to seq {last_seq}"
        return "TAMPERED", rec.seq, f"does not link to seq {last_seq}"
    if rec.seq > 0 and node_tag not in rec.body:
        claimed = _body(rec).get("node")
        if claimed is not None:
            return "FOREIGN_ORIGIN", rec.seq, f"record names node {claimed!r}"
    return None, rec.seq, ""


def _check_mac(rec: RawRecord, epochs: hmac_epochs.EpochKeys, hid: str | None,
               last_epoch: int, last: RawRecord | None) -> tuple[str | None, str, int]:
    if rec.mac is None or rec.key_id is None:
        return "TAMPERED", "record carries no MAC", last_epoch
    parsed = _parse_key_id(rec.key_id) if type(rec.key_id) is str else None
    if parsed is None or parsed[0] != hid:
        return "UNKNOWN_KEY", f"MAC key id {rec.key_id!r} is not the node's HMAC key", last_epoch
    epoch = parsed[1]
    if epoch < last_epoch:
        return "TAMPERED", f"MAC epoch {epoch} goes back from epoch {last_epoch}", last_epoch
    if epoch > last_epoch + 1:
        return "EPOCH_GAP", f"epochs {last_epoch}..{epoch - 1} were never sealed", last_epoch
    if epoch == last_epoch + 1:
        sealed = last is not None and last.kind == "key" and _body(last).get("event") == "seal" \
            and _body(last).get("epoch") == last_epoch
        if not sealed:
            return "EPOCH_GAP", f"epoch {last_epoch} ends without its seal record", last_epoch
    # hmac.digest is the one-shot C path of hmac_epochs.mac (same HMAC-SHA256 over the hash)
    if hmac.digest(epochs.key(epoch), rec.hash, "sha256") != rec.mac:
        return "TAMPERED", f"MAC does not verify with the epoch {epoch} key", last_epoch
    return None, "", epoch


@functools.lru_cache(maxsize=4096)
def _parse_key_id(key_id: str) -> tuple[str, int] | None:
    return hmac_epochs.parse_key_id(key_id)


def follow_rotation(body: dict[str, Any], origin: str,
                     signers: list[Ed25519PublicKey]) -> tuple[str | None, str]:
    """Accept a rotated signing key only when the current key endorsed it."""
    try:
        new_raw = base64.b64decode(str(body.get("public_key")), validate=True)
        endorsement = base64.b64decode(str(body.get("endorsement")), validate=True)
        new_key = public_from_raw(new_raw)
        signers[-1].verify(endorsement, rotation_message(origin, new_raw))
    except (ValueError, InvalidSignature, LedgerKeyError):
        return "UNKNOWN_KEY", "signing key rotation not endorsed by the current key"
    signers.append(new_key)
    return None, ""


def _scan_checkpoints(scan: NodeScan, node: str, texts: Sequence[str],
                      signers: list[Ed25519PublicKey], ledger_size: int) -> None:
    verified: list[Checkpoint] = []
    for text in texts:
        cp = None
        problem: tuple[str, str] | None = None
        for key in signers:
            try:
                cp = verify_checkpoint(text, key, scan.origin)
                problem = None
                break
            except CheckpointInvalid as exc:
                code = "FOREIGN_ORIGIN" if "origin" in exc.message else (
                    "UNKNOWN_KEY" if "not signed by" in exc.message else "TAMPERED")
                problem = (code, exc.message)
            except CheckpointError as exc:
                problem = ("TAMPERED", f"unreadable checkpoint: {exc.message}")
        if problem is not None:
            scan.findings.append(Finding(problem[0], node, None, problem[1]))
        elif cp is not None:  # with no key to check it by, a checkpoint proves nothing
            verified.append(cp)
    for cp in sorted(verified, key=lambda c: c.size):
        if cp.size > ledger_size:
            scan.findings.append(Finding("ROLLBACK", node, ledger_size,
                                         f"ledger holds {ledger_size} records but its own "
                                         f"checkpoint says {cp.size}"))
            continue
        if cp.size > len(scan.good):
            continue  # covers records past the first bad one: already reported
        if scan.tree().root(cp.size) != cp.root \
                or scan.good[cp.size - 1].hash.hex() != cp.head_hash:
            scan.findings.append(Finding("FORK", node, None,
                                         f"records differ from the ledger's own signed "
                                         f"checkpoint of size {cp.size}"))
            scan.good, scan.leaves = [], []
            return
        scan.valid_checkpoints.append(cp)
