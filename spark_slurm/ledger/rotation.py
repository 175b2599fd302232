"""Signing-key rotation of a live ledger together with its key files, crash-safely.

The ledger's rotation record (`Ledger.rotate_signing_key`) and the key file the
daemon loads at start must never disagree for good, or sparkd would refuse to
start ("signing key X is not the ledger's current key Y"). So the new key is
first written beside the old one as `<key>.next` (0600, fsynced), then the
rotation is committed, then `.next` replaces the key file. A crash between the
steps leaves a `.next` file that `open_rotating` settles at the next start: the
ledger's current key id says whether the rotation was committed (use and keep
`.next`) or not (remove it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.durable import replace_file, sync_dir
from spark_slurm.errors import LedgerKeyError
from spark_slurm.ledger.keys import load_signing_key, private_pem, public_pem, signing_key_id
from spark_slurm.ledger.store import Ledger


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did: the key ids, the committed `key` record, the files."""

    prev_key_id: str
    key_id: str
    seq: int
    checkpoint_size: int
    signing_key: Path
    public_key: Path


def next_path(signing_key: Path) -> Path:
    return signing_key.with_name(signing_key.name + ".next")


def public_path(signing_key: Path) -> Path:
    """Where the public half goes: `node.key` -> `node.pub`, as keygen lays them out."""
    return signing_key.with_suffix(".pub")


def stage_key(signing_key: Path) -> Ed25519PrivateKey:
    """Step 1: a fresh key, durable as `<key>.next` before the ledger names it."""
    key = Ed25519PrivateKey.generate()
    try:
        replace_file(next_path(signing_key), private_pem(key), 0o600)
    except OSError as exc:
        raise LedgerKeyError(f"{signing_key}: cannot write the new key: {exc.strerror}") from None
    return key


def install_key(signing_key: Path) -> Path:
    """Step 3: `.next` becomes the key file (the old private key is gone) and the
    public half is written beside it; returns the public key's path."""
    staged = next_path(signing_key)
    pub = public_pem(load_signing_key(staged))
    try:
        os.replace(staged, signing_key)
        sync_dir(signing_key.parent)
        replace_file(public_path(signing_key), pub, 0o644)
    except OSError as exc:
        raise LedgerKeyError(f"{signing_key}: cannot install the new key: {exc.strerror}") \
            from None
    return public_path(signing_key)


def rotate(ledger: Ledger, signing_key: Path) -> Rotation:
    """Rotate a live ledger's signing key and its key file; then checkpoint, so the
    newest checkpoint is signed by the new key."""
    prev = ledger.signing_key_id
    if prev is None:
        raise LedgerKeyError(f"{ledger.path}: the ledger has no signing key to rotate")
    new = stage_key(signing_key)
    try:
        receipt = ledger.rotate_signing_key(new)
    except BaseException:
        next_path(signing_key).unlink(missing_ok=True)  # not committed: never used
        raise
    pub = install_key(signing_key)
    cp = ledger.checkpoint()
    return Rotation(prev, signing_key_id(new.public_key()), receipt.seq, cp.size, signing_key,
                    pub)


def open_rotating(path: Path, hmac_key: bytes | None, signing_key: Path | None,
                  **options: Any) -> Ledger:
    """`Ledger.open` with the key file, first settling a rotation a crash interrupted."""
    if signing_key is None:
        return Ledger.open(path, hmac_key, None, **options)
    staged = next_path(signing_key)
    if not staged.exists():
        return Ledger.open(path, hmac_key, load_signing_key(signing_key), **options)
    try:
        ledger = Ledger.open(path, hmac_key, load_signing_key(signing_key), **options)
    except LedgerKeyError:
        # the rotation was committed: the staged key is the ledger's current one
        ledger = Ledger.open(path, hmac_key, load_signing_key(staged), **options)
        try:
            install_key(signing_key)
        except BaseException:
            ledger.close()
            raise
        return ledger
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()  # never committed
    return ledger
