"""Key files and key ids: HMAC K[0], Ed25519 node key pair.

Files: `hmac.key` (64 hex chars + newline, so `openssl -macopt hexkey:` can use
it), `node.key` (PKCS#8 PEM) and `node.pub` (SubjectPublicKeyInfo PEM, what
`openssl pkeyutl -verify` reads). Secret files must be mode 0600: a key that
group or others can read is refused, because it no longer proves anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spark_slurm.durable import create_new
from spark_slurm.errors import LedgerKeyError

HMAC_FILE = "hmac.key"
SIGNING_FILE = "node.key"
PUBLIC_FILE = "node.pub"


@dataclass(frozen=True, slots=True)
class KeyFiles:
    """Where `keygen` put the three files."""

    hmac_key: Path
    signing_key: Path
    public_key: Path


def hmac_key_id(k0: bytes) -> str:
    """Public id of an HMAC key: HMAC-SHA256(K[0], "spark-ledger key id"), 16 hex."""
    return hmac.new(k0, b"spark-ledger key id", hashlib.sha256).hexdigest()[:16]


def public_raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signing_key_id(key: Ed25519PublicKey | bytes) -> str:
    """Public id of a signing key: SHA-256 of its 32 raw bytes, first 16 hex."""
    raw = key if isinstance(key, bytes) else public_raw(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise LedgerKeyError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_raw(key)).decode()


def _check_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerKeyError(f"{path}: cannot read key file: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LedgerKeyError(
            f"{path}: key file is accessible by group or others (mode {mode & 0o777:o}); "
            "chmod 600 it"
        )
    return data


def load_hmac_key(path: str | os.PathLike[str]) -> bytes:
    """K[0] from a hex file written by `keygen`."""
    p = Path(path)
    text = _check_private(p).decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise LedgerKeyError(f"{p}: not an HMAC key (expected 64 hex characters)") from None
    if len(key) != 32:
        raise LedgerKeyError(f"{p}: HMAC key must be 32 bytes, got {len(key)}")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The node's Ed25519 private key (PKCS#8 PEM)."""
    p = Path(path)
    data = _check_private(p)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise LedgerKeyError(f"{p}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerKeyError(f"{p}: not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key (SubjectPublicKeyInfo PEM, as `keygen` writes)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise LedgerKeyError(f"{p}: cannot read key file: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise LedgerKeyError(f"{p}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerKeyError(f"{p}: not an Ed25519 public key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """The key as a `node.key` file holds it (PKCS#8 PEM, unencrypted: the file mode guards it)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The public half as a `node.pub` file holds it (SubjectPublicKeyInfo PEM)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def keygen(directory: str | os.PathLike[str]) -> KeyFiles:
    """Write a fresh HMAC K[0] and Ed25519 key pair into DIR; never overwrite."""
    d = Path(directory)
    files = KeyFiles(d / HMAC_FILE, d / SIGNING_FILE, d / PUBLIC_FILE)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerKeyError(f"{d}: cannot create key directory: {exc.strerror}") from None
    for path in (files.hmac_key, files.signing_key, files.public_key):
        if path.exists():
            raise LedgerKeyError(f"{path}: already exists; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    try:
        create_new(files.hmac_key, (secrets.token_bytes(32).hex() + "\n").encode(), 0o600)
        create_new(files.signing_key, private_pem(private), 0o600)
        create_new(files.public_key, public_pem(private), 0o644)
    except OSError as exc:
        raise LedgerKeyError(f"{d}: cannot write key files: {exc.strerror}") from None
    return files
