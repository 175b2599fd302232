"""Signed checkpoints: tree size, Merkle root and chain head as a C2SP signed note.

Text (https://c2sp.org/tlog-checkpoint, https://c2sp.org/signed-note):

    spark/<cluster>/<node>
    <tree size>
    <base64 Merkle root>
    head <hex hash of record size-1>

    — <key name> <base64(4-byte key hash ‖ 64-byte Ed25519 signature)>

The signature covers the body (first four lines, each ending in a newline); the
key hash is SHA-256(name ‖ 0x0A ‖ 0x01 ‖ 32-byte public key)[:4]. Anyone who
keeps one of these can later prove a ledger was truncated or forked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spark_slurm.errors import CheckpointError, CheckpointInvalid
from spark_slurm.ledger.keys import public_raw

SIG_PREFIX = "— "
_ED25519 = b"\x01"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A parsed checkpoint; `text` is the exact signed note."""

    origin: str
    size: int
    root: bytes
    head_hash: str
    text: str

    @property
    def body(self) -> str:
        return self.text.split("\n\n", 1)[0] + "\n"


def origin_for(cluster: str, node: str) -> str:
    """Origin line naming cluster and node; also the signing key's note name."""
    origin = f"spark/{cluster}/{node}"
    if any(c.isspace() or c == "+" for c in origin):
        raise CheckpointError(f"origin {origin!r} may not contain spaces or '+'")
    return origin


def note_key_hash(name: str, public: Ed25519PublicKey) -> bytes:
    """Signed-note key hash for an Ed25519 key."""
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public_raw(public)).digest()[:4]


def body_text(origin: str, size: int, root: bytes, head_hash: str) -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\nhead {head_hash}\n"


def sign_checkpoint(origin: str, size: int, root: bytes, head_hash: str,
                    key: Ed25519PrivateKey) -> Checkpoint:
    """Make and sign a checkpoint with the node key, named by the origin."""
    body = body_text(origin, size, root, head_hash)
    sig = key.sign(body.encode())
    blob = base64.b64encode(note_key_hash(origin, key.public_key()) + sig).decode()
    text = f"{body}\n{SIG_PREFIX}{origin} {blob}\n"
    return Checkpoint(origin, size, root, head_hash, text)


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"checkpoint {what} is not base64") from None


def signatures(text: str) -> list[tuple[str, bytes, bytes]]:
    """(name, key hash, signature) of each signature line of a note."""
    out = []
    _, _, sigs = text.partition("\n\n")
    for line in sigs.splitlines():
        if not line.startswith(SIG_PREFIX):
            raise CheckpointError(f"checkpoint signature line {line!r} does not start with '— '")
        name, _, blob = line[len(SIG_PREFIX):].partition(" ")
        raw = _b64(blob, "signature")
        if not name or len(raw) < 5:
            raise CheckpointError("checkpoint signature line is too short")
        out.append((name, raw[:4], raw[4:]))
    return out


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse (not verify) a checkpoint note; CheckpointError names what is malformed."""
    if not isinstance(text, str) or not text.endswith("\n") or "\n\n" not in text:
        raise CheckpointError("checkpoint is not a signed note (body, blank line, signatures)")
    body, _, _ = text.partition("\n\n")
    lines = body.split("\n")
    if len(lines) < 4:
        raise CheckpointError("checkpoint body needs origin, size, root and head lines")
    origin, size_s, root_s = lines[0], lines[1], lines[2]
    if not origin or any(c.isspace() for c in origin):
        raise CheckpointError(f"checkpoint origin {origin!r} is empty or has spaces")
    if not size_s.isdigit() or (size_s != "0" and size_s.startswith("0")):
        raise CheckpointError(f"checkpoint tree size {size_s!r} is not a decimal number")
    root = _b64(root_s, "root hash")
    if len(root) != 32:
        raise CheckpointError(f"checkpoint root is {len(root)} bytes, not 32")
    heads = [ln[5:] for ln in lines[3:] if ln.startswith("head ")]
    if any(not ln for ln in lines[3:]) or len(heads) != 1:
        raise CheckpointError("checkpoint needs exactly one 'head <hash>' extension line")
    head = heads[0]
    if len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
        raise CheckpointError(f"checkpoint head {head!r} is not 64 lowercase hex digits")
    if not signatures(text):
        raise CheckpointError("checkpoint carries no signature")
    return Checkpoint(origin, int(size_s), root, head, text)


def verify_checkpoint(text: str | Checkpoint, public_key: Ed25519PublicKey,
                      origin: str | None = None) -> Checkpoint:
    """The checkpoint, if one of its signatures is by `public_key`; else CheckpointInvalid."""
    cp = parse_checkpoint(text.text if isinstance(text, Checkpoint) else text)
    if origin is not None and cp.origin != origin:
        raise CheckpointInvalid(f"checkpoint origin {cp.origin!r} is not {origin!r}")
    found = False
    for name, key_hash, sig in signatures(cp.text):
        if key_hash != note_key_hash(name, public_key):
            continue
        found = True
        try:
            public_key.verify(sig, cp.body.encode())
        except InvalidSignature:
            continue
        return cp
    if not found:
        raise CheckpointInvalid(
            f"checkpoint of {cp.origin} size {cp.size} is not signed by the given key"
        )
    raise CheckpointInvalid(f"checkpoint of {cp.origin} size {cp.size}: bad signature")


def export_checkpoint(cp: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write the note to a file atomically (what a head node or auditor keeps)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(cp.text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(p)
    return p


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and parse a kept checkpoint file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p}: cannot read checkpoint: {exc}") from None
    try:
        return parse_checkpoint(text)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc.message}") from None
