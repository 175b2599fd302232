"""Checking a node's records page by page, naming what is wrong with a fixed code.

The scan walks the rows in seq order, from genesis or from where the head node's
copy of the chain ends, and stops at the first record it cannot trust:
everything after it hangs off a broken link. Each problem gets the code
an operator can act on (GAP, REORDER, DUPLICATE, TAMPERED, FOREIGN_ORIGIN,
UNKNOWN_KEY, EPOCH_GAP) with the node and seq. Hashes, MACs, envelopes, Merkle
leaves and checkpoint signatures are checked with the ledger package's own
functions, so the head node and `sparkctl verify` cannot disagree on a byte.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from cryptography.exceptions import InvalidSignature

from spark_slurm.errors import CheckpointError, CheckpointInvalid, LedgerKeyError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.store import Finding
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.chain import GENESIS_PREV, continues, link_hash
from spark_slurm.ledger.checkpoint import (
    Checkpoint,
    origin_for,
    parse_checkpoint,
    verify_checkpoint,
)
from spark_slurm.ledger.keys import hmac_key_id, public_from_raw, signing_key_id
from spark_slurm.ledger.records import envelope_suffix
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


def ref_seq_of(body: bytes) -> int | None:
    """`body.ref.seq` of a stored envelope when it is an integer SQLite can hold
    (indexed by the cluster store for audit's follow-up lookups)."""
    if REF_TAG not in body:
        return None
    try:
        ref = json.loads(body)["body"].get("ref")
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    seq = ref.get("seq") if isinstance(ref, dict) else None
    return seq if isinstance(seq, int) and -2**63 <= seq < 2**63 else None


class Lookups(Protocol):
    """What the rare slow-path checks look up beyond the rows being fed: the hash
    at a seq (the private copy, or the cluster store for what it already holds),
    and the newest seq of the copy whose stored hash is a given one."""

    def hash_at(self, seq: int) -> bytes | None: ...

    def seq_of_hash(self, value: bytes) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a node ledger says it is (its genesis) and the keys merge checks it with."""

    node: str
    origin: str | None
    k0: bytes | None
    signers: tuple[Ed25519PublicKey, ...]


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


def genesis_body(rec: RawRecord | None) -> dict[str, Any]:
    """The PER body of a genesis record ({} when it is not one)."""
    if rec is None or rec.seq != 0 or rec.kind != "genesis":
        return {}
    return _body(rec)


def identify(genesis: dict[str, Any], keys: KeyRing | None, expected_node: str | None,
             fallback_name: str) -> tuple[Identity | None, Finding | None, str]:
    """The node a genesis names and the keys to check it with, or the finding that
    stops the merge of this source (FOREIGN_ORIGIN, UNKNOWN_KEY), and the node name."""
    node = str(genesis.get("node", fallback_name))
    origin = origin_for(str(genesis.get("cluster", "spark")), node) \
        if genesis.get("node") else None
    if expected_node is not None and node != expected_node:
        return None, Finding("FOREIGN_ORIGIN", expected_node, 0,
                             f"ledger belongs to node {node!r}, collected as "
                             f"{expected_node!r}"), expected_node
    public = k0 = None
    if keys is not None:
        try:
            public, k0 = keys.public(node), keys.hmac(node)
        except LedgerKeyError as exc:
            return None, Finding("UNKNOWN_KEY", node, None, exc.message), node
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
            return None, Finding("UNKNOWN_KEY", node, 0 if "genesis" in problem else None,
                                 problem), node
    elif isinstance(genesis.get("signing_public_key"), str):
        try:
            public = public_from_raw(base64.b64decode(genesis["signing_public_key"]))
        except (ValueError, LedgerKeyError):
            public = None
    return Identity(node, origin, k0, (public,) if public is not None else ()), None, node


class ChainScan:
    """Accept a node's records, page by page, while they check out; stop at the first
    that does not, with its finding.

    It starts at genesis or resumes after the records the head node holds (their
    last seq, hash and record, and the signing keys followed so far). A record like
    the one before it (next seq, links to it, hashes right, columns match the
    envelope, names the node, MAC'd under the same key id, not a key event) is
    accepted by the inline test; anything else takes `_check` and `_check_mac`
    exactly as written, so findings do not depend on the fast path. Both decide the
    link with `chain.continues`, the rule `sparkctl verify` applies. The inline test
    skips the DUPLICATE lookup: a record whose hash verifies and whose envelope
    names its own seq cannot repeat an earlier hash short of a SHA-256 collision.
    Memory holds one page: earlier rows are reached through `lookups`."""

    def __init__(self, ident: Identity, lookups: Lookups, *, last: RawRecord | None = None,
                 fast: bool = True) -> None:
        self.node = ident.node
        self.origin = ident.origin
        self.signers = list(ident.signers)
        self.lookups = lookups
        self.fast = fast
        self.findings: list[Finding] = []
        self.stopped = False
        self.epochs = hmac_epochs.EpochKeys(ident.k0) if ident.k0 is not None else None
        self.hid = hmac_key_id(ident.k0) if ident.k0 is not None else None
        self.node_tag = b'"node":' + json.dumps(ident.node, ensure_ascii=False).encode()
        self.last: Sequence[Any] | None = last
        self.prev = last.hash if last is not None else GENESIS_PREV
        self.last_seq = last.seq if last is not None else -1
        self.last_epoch = 0
        if last is not None and self.epochs is not None and type(last.key_id) is str:
            parsed = _parse_key_id(last.key_id)
            self.last_epoch = parsed[1] if parsed is not None else 0
        self.mac_kid: str | None = None  # key id the inline test accepts, and its MAC
        self.mac_of: Callable[[bytes], bytes] | None = None

    def accept(self, rec: Sequence[Any]) -> bool:
        """Check the next record (a RawRecord, or a plain tuple of its columns); False
        (and `stopped`, with its finding) when it fails. Called once per row from
        inside the store's INSERT ... SELECT, so the fast test is inline."""
        if self.stopped:
            return False
        seq, time_ns, kind, job, body, _, rec_hash, mac, key_id = rec
        epochs = self.epochs
        if (self.fast and kind != "key" and continues(rec, self.last_seq + 1, self.prev)
                and body.endswith(_suffix_of(seq, time_ns, kind, job))
                and (seq == 0 or self.node_tag in body)
                and (epochs is None or (key_id == self.mac_kid and mac is not None
                                        and self.mac_of is not None
                                        and self.mac_of(rec_hash) == mac))):
            self.prev, self.last_seq, self.last = rec_hash, seq, rec
            return True
        return self._slow(rec if isinstance(rec, RawRecord) else RawRecord._make(rec))

    def _slow(self, rec: RawRecord) -> bool:
        epochs, key_id = self.epochs, rec.key_id
        last = self.last
        if last is not None and not isinstance(last, RawRecord):
            last = RawRecord._make(last)
        code, bad_seq, why = _check(rec, self.prev, self.last_seq, self.lookups,
                                    node_tag=self.node_tag)
        if code is None and epochs is not None:
            code, why, self.last_epoch = _check_mac(rec, epochs, self.hid, self.last_epoch,
                                                    last)
            bad_seq = rec.seq
            if code is None and key_id != self.mac_kid:
                self.mac_kid = key_id
                self.mac_of = hmac_epochs.mac_function(epochs.key(self.last_epoch))
        if code is None and rec.kind == "key" and self.signers:
            body_obj = _body(rec)
            if body_obj.get("event") == "rotate":
                code, why = follow_rotation(body_obj, self.origin or "", self.signers)
        if code is not None:
            self.stop(code, bad_seq, why)
            return False
        self.prev, self.last_seq, self.last = rec.hash, rec.seq, rec
        return True

    def stop(self, code: str, seq: int | None, why: str) -> None:
        """End the scan with a finding (also for what the caller found, e.g. a row the
        database could not hand over)."""
        if not self.stopped:
            self.findings.append(Finding(code, self.node, seq, why))
            self.stopped = True

    def feed(self, rows: Sequence[RawRecord]) -> int:
        """Check the next rows in seq order; returns how many leading ones were accepted."""
        taken = 0
        for rec in rows:
            if not self.accept(rec):
                break
            taken += 1
        return taken


_KIND_JSON: dict[str, bytes] = {}


_NO_SUFFIX = b"\x00"  # no envelope ends with it: a column of the wrong type never matches


def _suffix(rec: RawRecord) -> bytes:
    return _suffix_of(rec.seq, rec.time_ns, rec.kind, rec.job_id)


def _suffix_of(seq: Any, time_ns: Any, kind_text: Any, job: Any) -> bytes:
    """`envelope_suffix` with the kind's JSON cached: it runs once per record. A
    column rewritten with another type (a BLOB kind, a TEXT time) gives `_NO_SUFFIX`."""
    kind = _KIND_JSON.get(kind_text)
    if kind is None:
        if type(kind_text) is not str:
            return _NO_SUFFIX
        if len(_KIND_JSON) > 256:
            _KIND_JSON.clear()
        kind = _KIND_JSON.setdefault(kind_text, json.dumps(kind_text).encode())
    if type(time_ns) is not int or type(seq) is not int or not (
            job is None or type(job) is str):
        return _NO_SUFFIX
    if job is None:
        return b',"job":null,"kind":%b,"seq":%d,"time_ns":%d}' % (kind, seq, time_ns)
    if job.isascii() and job.isprintable() and '"' not in job and "\\" not in job:
        return b',"job":"%b","kind":%b,"seq":%d,"time_ns":%d}' % (
            job.encode(), kind, seq, time_ns)
    return envelope_suffix(seq, time_ns, kind_text, job)


def _check(rec: RawRecord, prev: bytes, last_seq: int, lookups: Lookups, *,
           node_tag: bytes) -> tuple[str | None, int, str]:
    if rec.seq <= last_seq:
        return "REORDER", rec.seq, f"seq {rec.seq} appears after seq {last_seq}"
    if rec.seq > last_seq + 1:
        return "GAP", last_seq + 1, f"seqs {last_seq + 1}..{rec.seq - 1} are missing"
    if type(rec.kind) is not str or not (rec.job_id is None or type(rec.job_id) is str):
        return "TAMPERED", rec.seq, "a column has the wrong type"  # as `sparkctl verify`
    copied = _envelope_seq(rec.body)
    if copied is not None and copied < rec.seq and lookups.hash_at(copied) == rec.hash:
        return "DUPLICATE", rec.seq, f"repeats the record of seq {copied}"
    if link_hash(rec.prev_hash, rec.body) != rec.hash:
        return "TAMPERED", rec.seq, "stored bytes do not hash to the stored hash"
    if not rec.body.endswith(_suffix(rec)):
        env_seq = _envelope_seq(rec.body)
        if env_seq is None or env_seq == rec.seq:
            return "TAMPERED", rec.seq, "seq/time/kind/job columns differ from the hashed record"
        linked = lookups.seq_of_hash(rec.prev_hash)
        if linked is not None and linked >= rec.seq:
            return "REORDER", rec.seq, (f"holds the record of seq {env_seq}, which links to "
                                        "a record stored after it")
        if env_seq == rec.seq - 1:
            return "TAMPERED", rec.seq - 1, (f"a record was inserted at seq {rec.seq - 1} "
                                             "(later records renumbered)")
        if env_seq == rec.seq + 1:
            return "GAP", rec.seq, (f"the record of seq {rec.seq} was deleted "
                                    "(later records renumbered)")
        return "REORDER", rec.seq, f"holds the record of seq {env_seq}"
    if not continues(rec, last_seq + 1, prev):  # seq and hash were checked: the link fails
        linked = lookups.seq_of_hash(rec.prev_hash)
        if linked is not None:
            return "REORDER", rec.seq, f"links to seq {linked}, not to seq {last_seq}"
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
    sealed = epoch > last_epoch and last is not None and last.kind == "key" \
        and _body(last).get("event") == "seal" and _body(last).get("epoch") == last_epoch
    if epoch > last_epoch + 1:  # name the epochs whose seal is missing, not one sealed
        first = last_epoch + 1 if sealed else last_epoch
        missing = f"epoch {first} was" if first == epoch - 1 \
            else f"epochs {first}..{epoch - 1} were"
        return "EPOCH_GAP", f"{missing} never sealed", last_epoch
    if epoch == last_epoch + 1 and not sealed:
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


def signed_checkpoints(node: str, origin: str | None, texts: Sequence[str],
                       signers: Sequence[Ed25519PublicKey]
                       ) -> tuple[list[Checkpoint], list[Finding]]:
    """The checkpoints signed by one of the node's keys, in size order, and a finding
    for each that is not (with no key to check it by, a checkpoint proves nothing)."""
    verified: list[Checkpoint] = []
    findings: list[Finding] = []
    for text in texts:
        cp = None
        problem: tuple[str, str] | None = None
        for key in signers:
            try:
                cp = verify_checkpoint(text, key, origin)
                problem = None
                break
            except CheckpointInvalid as exc:
                code = "FOREIGN_ORIGIN" if "origin" in exc.message else (
                    "UNKNOWN_KEY" if "not signed by" in exc.message else "TAMPERED")
                problem = (code, exc.message)
            except CheckpointError as exc:
                problem = ("TAMPERED", f"unreadable checkpoint: {exc.message}")
        if problem is not None:
            findings.append(Finding(problem[0], node, None, problem[1]))
        elif cp is not None:
            verified.append(cp)
    return sorted(verified, key=lambda c: c.size), findings


def checkpoint_sizes(texts: Sequence[str]) -> set[int]:
    """The tree sizes the checkpoint notes name (unverified: roots are compared there)."""
    sizes = set()
    for text in texts:
        try:
            sizes.add(parse_checkpoint(text).size)
        except CheckpointError:
            continue
    return sizes
