"""`sparkctl witness`: the head node checks and cosigns each node's latest checkpoint.

Every 15 minutes a timer hands the witness a node's newest signed checkpoint and
a consistency proof from the checkpoint it last witnessed for that origin. The
witness verifies the node's signature, refuses anything smaller than or not
consistent with what it already holds, then stores the new checkpoint and adds
its own Ed25519 signature line to the note (a signed-note cosignature). State
changes are made under an exclusive lock with write-temp-then-rename, so two
concurrent adds serialise and neither can roll the other back. A node that
rewrites its history can therefore only hide what it wrote since its last
witnessed checkpoint: at most one timer period (15 minutes), not a whole night.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import socket
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.durable import replace_file
from spark_slurm.errors import CheckpointInvalid, InputError, LedgerError, WitnessError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.scan import follow_rotation
from spark_slurm.ledger.checkpoint import (
    SIG_PREFIX,
    Checkpoint,
    note_key_hash,
    parse_checkpoint,
    signatures,
    verify_checkpoint,
)
from spark_slurm.ledger.cut import cut_of
from spark_slurm.ledger.keys import load_signing_key, private_pem, public_pem
from spark_slurm.ledger.merkle import verify_consistency
from spark_slurm.ledger.reader import LedgerReader
from spark_slurm.ledger.schema import open_existing
from spark_slurm.ledger.segment import read_witness_part

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KEY_FILE = "witness.key"
PUB_FILE = "witness.pub"
NAME_FILE = "witness.name"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WitnessResult:
    """What the witness did with one checkpoint."""

    origin: str
    size: int
    previous_size: int | None
    status: str  # "accepted" | "unchanged"
    text: str  # the cosigned checkpoint note


def _safe(origin: str) -> str:
    return origin.replace("/", "_")


def node_of(origin: str) -> str:
    """The node an origin `spark/<cluster>/<node>` names."""
    return origin.rsplit("/", 1)[-1]


@contextmanager
def locked_state(state: Path) -> Iterator[None]:
    """The witness state's exclusive lock (adds serialise under it; so does a backup)."""
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def witness_key(state: Path) -> tuple[str, Ed25519PrivateKey]:
    """The witness's name and key, created on first use (key file mode 0600)."""
    key_path = state / KEY_FILE
    name_path = state / NAME_FILE
    with locked_state(state):
        if not key_path.exists():
            key = Ed25519PrivateKey.generate()
            replace_file(key_path, private_pem(key), 0o600)
            replace_file(state / PUB_FILE, public_pem(key), 0o644)
            name = f"witness/{socket.gethostname().split('.')[0]}"
            replace_file(name_path, (name + "\n").encode(), 0o644)
    name = name_path.read_text().strip() if name_path.exists() else "witness"
    return name, load_signing_key(key_path)


def read_proof(path: Path) -> list[bytes]:
    """A consistency proof file: one hash per line, hex or base64."""
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read proof: {exc}") from None
    out = []
    for i, line in enumerate(lines, 1):
        try:
            raw = bytes.fromhex(line) if len(line) == 64 else base64.b64decode(line, validate=True)
        except (ValueError, binascii.Error):
            raise InputError(f"{path}:{i}: not a hex or base64 hash") from None
        if len(raw) != 32:
            raise InputError(f"{path}:{i}: a proof hash is 32 bytes, got {len(raw)}")
        out.append(raw)
    return out


def proof_from_ledger(ledger: Path, old_size: int, new_size: int, *,
                      stored: bool = True) -> list[bytes]:
    """The consistency proof between two sizes from a node ledger snapshot, read from
    the subtrees the node keeps: O(log n) row reads however long the ledger, where
    hashing every record's bytes would cost the 15-minute witness a pass over the
    whole history each time. `stored=False` hashes the bytes instead (a few blocks
    of leaves in memory at a time): the witness's second opinion before it calls a
    failing proof a fork. A pruned ledger answers only from its stored subtrees."""
    try:
        with LedgerReader(ledger) as reader:
            if reader.size < new_size:
                raise WitnessError(f"{ledger}: holds {reader.size} records, checkpoint "
                                   f"claims {new_size}")
            cut = cut_of(reader.meta, str(ledger))
            try:
                return reader.tree(new_size, stored=stored or cut is not None
                                   ).consistency_proof(old_size)
            except ValueError as exc:
                if cut is None:
                    raise WitnessError(f"{ledger}: {exc}") from None
                raise WitnessError(f"{ledger}: pruned before seq {cut.seq}: the proof from "
                                   f"size {old_size} needs records it no longer holds"
                                   ) from None
    except LedgerError as exc:
        raise WitnessError(exc.message) from None


def _consistent(ledger: Path | None, old: Checkpoint, cp: Checkpoint, proof: list[bytes],
                *, from_ledger: bool) -> bool:
    """Whether `proof` shows `cp` extends `old`; a proof read from the ledger's stored
    subtrees that fails is computed again from the records' bytes, so a damaged
    subtree table (which `sparkctl verify` names) is not taken for a rewritten
    history. A consistency proof proves itself, wherever it came from."""
    if verify_consistency(old.size, cp.size, old.root, cp.root, proof):
        return True
    if not from_ledger or ledger is None:
        return False
    again = proof_from_ledger(ledger, old.size, cp.size, stored=False)
    if again == proof or not verify_consistency(old.size, cp.size, old.root, cp.root, again):
        return False
    log.warning("%s: the stored Merkle subtrees disagree with the records (run sparkctl "
                "verify on it); the checkpoint is consistent by the records' own bytes",
                ledger)
    return True


def key_records(ledger: Path, size: int) -> list[tuple[int, bytes]]:
    """(seq, stored bytes) of the ledger's `key` records below `size` (an index lookup)."""
    conn, _ = open_existing(ledger)
    try:
        rows = conn.execute("SELECT seq, CAST(body AS BLOB) FROM per WHERE kind = 'key' AND"
                            " seq < ? ORDER BY seq", (size,)).fetchall()
    except sqlite3.DatabaseError as exc:
        raise WitnessError(f"{ledger}: unreadable ledger: {exc}") from None
    finally:
        conn.close()
    return [(int(seq), bytes(raw)) for seq, raw in rows]


def follow_keys(records: Sequence[tuple[int, bytes]], cp: Checkpoint,
                trusted: Ed25519PublicKey) -> list[Ed25519PublicKey]:
    """The trusted key, then each signing key it endorsed in turn in the `rotate`
    records (seq, stored bytes) within the checkpoint's size, as `sparkctl verify`
    follows them.

    An endorsement is the outgoing key's signature over the origin and the new key,
    so it proves itself, wherever the record came from (the ledger, or a segment);
    a rotation that is not endorsed ends the chain. This lets the 15-minute witness
    go on after `sparkctl ledger rotate-key` without the head node's copy of the
    node's public key being replaced first."""
    signers = [trusted]
    for seq, raw in sorted(records):
        if seq >= cp.size:
            break
        try:
            body = json.loads(raw)["body"]
        except (ValueError, KeyError, TypeError):
            continue  # not a rotation the witness could follow; merge judges the record
        if isinstance(body, dict) and body.get("event") == "rotate" \
                and follow_rotation(body, cp.origin, signers)[0] is not None:
            break
    return signers


def rotated_keys(ledger: Path, cp: Checkpoint, trusted: Ed25519PublicKey
                 ) -> list[Ed25519PublicKey]:
    """`follow_keys` over a node ledger snapshot's own key records."""
    return follow_keys(key_records(ledger, cp.size), cp, trusted)


def latest(state: Path, origin: str) -> Checkpoint | None:
    """The checkpoint last witnessed for an origin."""
    path = state / "checkpoints" / f"{_safe(origin)}.txt"
    if not path.exists():
        return None
    return parse_checkpoint(path.read_text(encoding="utf-8"))


def witnessed(state: Path) -> list[Checkpoint]:
    """Every origin's latest witnessed checkpoint (what merge checks nodes against)."""
    folder = state / "checkpoints"
    if not folder.is_dir():
        return []
    return [parse_checkpoint(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.txt"))]


def cosign(cp: Checkpoint, name: str, key: Ed25519PrivateKey) -> str:
    """The note with the witness's signature line added (once)."""
    key_hash = note_key_hash(name, key.public_key())
    if any(n == name and h == key_hash for n, h, _ in signatures(cp.text)):
        return cp.text
    sig = key.sign(cp.body.encode())
    return cp.text + f"{SIG_PREFIX}{name} {base64.b64encode(key_hash + sig).decode()}\n"


def witness_checkpoint(state: Path, text: str, keys: KeyRing, proof: list[bytes] | None = None,
                       ledger: Path | None = None, *, proof_from: int | None = None,
                       rotations: Sequence[tuple[int, bytes]] | None = None) -> WitnessResult:
    """Verify a node checkpoint against the last witnessed one, persist it, cosign it.

    `proof` runs from the witnessed size, or from `proof_from` when the caller knows
    it (a segment says which size its proof starts at: one from any other size than
    the witness holds is refused as stale, not as a fork). Rotations are followed in
    `rotations` (key records from a segment), else in `ledger`."""
    cp = parse_checkpoint(text)
    node = node_of(cp.origin)
    public: Ed25519PublicKey | None = keys.public(node)
    if public is None:
        raise WitnessError(f"UNKNOWN_KEY: no public key for node {node!r} in {keys.directory}")
    if rotations is not None:
        signers = follow_keys(rotations, cp, public)
    else:
        signers = [public] if ledger is None else rotated_keys(ledger, cp, public)
    problem = None
    for signer in reversed(signers):  # the trusted key last: its refusal is the one shown
        try:
            verify_checkpoint(cp, signer, cp.origin)
            problem = None
            break
        except CheckpointInvalid as exc:
            problem = exc
    if problem is not None:
        raise WitnessError(f"{node}: {problem.message}") from None
    name, key = witness_key(state)
    folder = state / "checkpoints"
    with locked_state(state):
        folder.mkdir(exist_ok=True)
        old = latest(state, cp.origin)
        if old is not None:
            if cp.size < old.size:
                raise WitnessError(f"ROLLBACK: {cp.origin} checkpoint size {cp.size} is smaller "
                                   f"than the witnessed size {old.size}")
            if cp.size == old.size:
                if cp.root != old.root:
                    raise WitnessError(f"FORK: {cp.origin} size {cp.size} has a different root "
                                       "than the witnessed checkpoint")
                return WitnessResult(cp.origin, cp.size, old.size, "unchanged", old.text)
            stale = proof is not None and proof_from is not None and proof_from != old.size
            from_ledger = False
            if (proof is None or stale) and ledger is not None:
                proof, from_ledger = proof_from_ledger(ledger, old.size, cp.size), True
            elif stale:
                raise WitnessError(f"{cp.origin}: the proof shipped runs from size "
                                   f"{proof_from}, the witness holds size {old.size}: "
                                   "collect again")
            if proof is None:
                raise WitnessError(f"{cp.origin}: a consistency proof from size {old.size} "
                                   "is needed (--proof or --ledger)")
            if not _consistent(ledger, old, cp, proof, from_ledger=from_ledger):
                raise WitnessError(f"FORK: {cp.origin} size {cp.size} is not consistent with "
                                   f"the witnessed size {old.size}")
        signed = cosign(cp, name, key)
        replace_file(folder / f"{_safe(cp.origin)}.txt", signed.encode(), 0o644)
        return WitnessResult(cp.origin, cp.size, old.size if old else None, "accepted", signed)


def witness_file(state: Path, checkpoint: Path, keys_dir: Path | None = None,
                 proof: Path | None = None, ledger: Path | None = None, *,
                 db: str | Path | None = None) -> WitnessResult:
    """The CLI entry point: read files, then `witness_checkpoint`; with `db`, keep the
    cosigned checkpoint in that cluster store too."""
    try:
        text = checkpoint.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{checkpoint}: cannot read checkpoint: {exc}") from None
    keys = KeyRing.load(keys_dir if keys_dir is not None else state / "keys")
    try:
        result = witness_checkpoint(state, text, keys, read_proof(proof) if proof else None,
                                    ledger)
    except OSError as exc:
        raise InputError(f"{state}: cannot use witness state: {exc.strerror or exc}") from None
    if db is not None:
        from spark_slurm.head.store import open_store  # noqa: PLC0415

        cp = parse_checkpoint(result.text)
        store = open_store(db, create=True)
        try:
            store.import_checkpoint(node_of(cp.origin), cp.origin, cp.size, cp.root.hex(),
                                    cp.text, source="witness")
        finally:
            store.close()
    return result


def witness_segment(state: Path, segment: Path, keys_dir: Path | None = None
                    ) -> WitnessResult | None:
    """Witness the newest checkpoint a segment carries, with the proof and key records
    it carries (no node history needed); None when the node has no checkpoint yet."""
    part = read_witness_part(segment)
    if part.checkpoint is None:
        return None
    keys = KeyRing.load(keys_dir if keys_dir is not None else state / "keys")
    proof = None
    if part.proof_from is not None and part.proof_to == parse_checkpoint(part.checkpoint).size:
        proof = part.proof
    try:
        return witness_checkpoint(state, part.checkpoint, keys, proof,
                                  proof_from=part.proof_from if proof is not None else None,
                                  rotations=part.rotations)
    except OSError as exc:
        raise InputError(f"{state}: cannot use witness state: {exc.strerror or exc}") from None
