"""Verify a ledger file from its bytes alone, naming the first record that fails.

Checks, in one pass over the rows in seq order: seq contiguity, the previous-hash
link, the columns against the hashed envelope, the hash, the HMAC and epoch seal
structure (when the ledger uses HMAC), signing-key rotations, then every
checkpoint kept in the file and every checkpoint given by the caller. Never
re-serialises: it hashes exactly the stored bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spark_slurm.errors import CheckpointError, CheckpointInvalid, LedgerError, LedgerKeyError
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.checkpoint import (
    Checkpoint,
    load_checkpoint,
    origin_for,
    parse_checkpoint,
    verify_checkpoint,
)
from spark_slurm.ledger.keys import (
    hmac_key_id,
    load_hmac_key,
    load_public_key,
    public_from_raw,
    signing_key_id,
)
from spark_slurm.ledger.merkle import Frontier
from spark_slurm.ledger.reader import ledger_meta
from spark_slurm.ledger.records import GENESIS_PREV, envelope_suffix
from spark_slurm.ledger.schema import (
    FORMAT,
    SCHEMA_ROWS,
    SCHEMA_VERSION,
    expected_schema,
    open_existing,
)
from spark_slurm.ledger.store import rotation_message


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of verifying one ledger; `reason` is empty when `ok`."""

    path: str
    ok: bool
    count: int
    head: str | None
    first_bad_seq: int | None = None
    reason: str = ""
    node: str | None = None
    hmac_checked: bool = False
    checkpoints_checked: int = 0
    signing_keys: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        """One line for people: what was verified, or where and why it failed."""
        if self.ok:
            return (f"{self.path}: ok, {self.count} records, head {self.head}, "
                    f"{self.checkpoints_checked} checkpoints"
                    + (", HMAC verified" if self.hmac_checked else ""))
        where = f"first bad seq {self.first_bad_seq}: " if self.first_bad_seq is not None else ""
        return f"{self.path}: {where}{self.reason}"


class _Bad(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class _Walk:
    """State of one pass over the rows."""

    def __init__(self, meta: dict[str, str], hmac_key: bytes | None, need: set[int]) -> None:
        self.meta = meta
        self.keys = hmac_epochs.EpochKeys(hmac_key) if hmac_key is not None else None
        self.hmac_id: str | None = None
        self.count = 0
        self.head = GENESIS_PREV
        self.frontier = Frontier()
        self.need = need  # tree sizes whose root and head we must remember
        self.roots: dict[int, tuple[bytes, bytes]] = {}
        self.epoch = 0
        self.sealed = False
        self.signing: list[tuple[int, Ed25519PublicKey]] = []  # (from tree size, key)
        self.node: str | None = None


def _genesis(w: _Walk, body: dict[str, Any]) -> None:
    if body.get("format") != FORMAT or body.get("schema_version") != SCHEMA_VERSION:
        raise _Bad(0, "genesis record does not name this ledger format and schema version")
    for key in ("node", "cluster"):
        if body.get(key) != w.meta.get(key):
            raise _Bad(0, f"genesis {key} {body.get(key)!r} differs from the file's meta table")
    if str(body.get("created_ns")) != w.meta.get("created_ns") or \
            str(body.get("epoch_seconds")) != w.meta.get("epoch_seconds"):
        raise _Bad(0, "genesis created_ns/epoch_seconds differ from the file's meta table")
    if (body.get("hmac_key_id") or "") != w.meta.get("hmac_key_id", ""):
        raise _Bad(0, "genesis hmac_key_id differs from the file's meta table")
    w.node = str(body["node"])
    w.hmac_id = body.get("hmac_key_id")
    pub = body.get("signing_public_key")
    if pub is not None:
        try:
            signer = public_from_raw(base64.b64decode(str(pub), validate=True))
        except (ValueError, LedgerKeyError):
            raise _Bad(0, "genesis signing public key is malformed") from None
        if signing_key_id(signer) != body.get("signing_key_id"):
            raise _Bad(0, "genesis signing_key_id does not match its public key")
        w.signing.append((1, signer))


def _key_record(w: _Walk, seq: int, body: dict[str, Any]) -> None:
    event = body.get("event")
    if event == "seal":
        if w.hmac_id is None or body.get("key_id") != w.hmac_id or body.get("epoch") != w.epoch:
            raise _Bad(seq, f"seal record does not seal the current epoch {w.epoch}")
        w.sealed = True
    elif event == "rotate":
        if not w.signing:
            raise _Bad(seq, "key rotation in a ledger that has no signing key")
        try:
            raw = base64.b64decode(body["public_key"], validate=True)
            new = public_from_raw(raw)
            w.signing[-1][1].verify(base64.b64decode(body["endorsement"], validate=True),
                                    rotation_message(origin_for(w.meta["cluster"],
                                                                w.meta["node"]), raw))
        except (KeyError, ValueError, TypeError, LedgerKeyError, InvalidSignature):
            raise _Bad(seq, "key rotation is not endorsed by the outgoing signing key") from None
        if body.get("key_id") != signing_key_id(raw):
            raise _Bad(seq, "key rotation names a key id that is not its public key's")
        w.signing.append((seq + 1, new))


def _mac(w: _Walk, seq: int, h: bytes, mac: bytes | None, key_id: str | None) -> None:
    if w.hmac_id is None:
        if mac is not None or key_id is not None:
            raise _Bad(seq, "record carries a MAC in a ledger created without HMAC")
        return
    parsed = hmac_epochs.parse_key_id(key_id) if isinstance(key_id, str) else None
    if parsed is None or parsed[0] != w.hmac_id or mac is None:
        raise _Bad(seq, "record has no MAC or a malformed key id")
    epoch = parsed[1]
    if seq == 0:
        if epoch != 0:
            raise _Bad(0, "genesis record is not in epoch 0")
    elif epoch == w.epoch + 1 and w.sealed:
        w.epoch, w.sealed = epoch, False
    elif epoch != w.epoch:
        raise _Bad(seq, f"record in epoch {epoch} follows epoch {w.epoch}"
                   + (" which was not sealed" if epoch == w.epoch + 1 else ""))
    elif w.sealed:
        raise _Bad(seq, f"record in epoch {epoch} after that epoch was sealed")
    if w.keys is not None and hmac_epochs.mac(w.keys.key(epoch), h) != mac:
        raise _Bad(seq, f"MAC does not verify with the epoch {epoch} key")


def _inner(seq: int, body: bytes) -> dict[str, Any]:
    try:
        inner = json.loads(body)["body"]
    except (ValueError, KeyError, TypeError):
        raise _Bad(seq, "stored bytes are not a JSON envelope") from None
    if not isinstance(inner, dict):
        raise _Bad(seq, "stored bytes hold no body object")
    return inner


def _walk(conn: sqlite3.Connection, w: _Walk) -> None:
    """The hot loop: written for speed (locals, a fast path for ordinary records
    in an unchanged epoch, the Merkle frontier inlined); rare records take the
    careful path through _genesis, _mac and _key_record."""
    sha256 = hashlib.sha256
    hmac_digest = hmac.digest
    # CAST: the same bytes whichever storage class (TEXT or BLOB) a row uses.
    cur = conn.execute("SELECT seq, time_ns, kind, job_id, CAST(body AS BLOB), "
                       "CAST(prev_hash AS BLOB), CAST(hash AS BLOB), CAST(mac AS BLOB), key_id "
                       "FROM per ORDER BY seq")
    suffixes: dict[tuple[str, str | None], str] = {}
    expect = 0
    head = w.head
    frontier = w.frontier
    fh = frontier.hashes
    need = w.need
    fast_key_id: str | None = None  # key id already checked for the current epoch
    fast_key: bytes | None = None
    try:
        # Row by row, so a damaged page is blamed on the right record.
        for seq, time_ns, kind, job_id, body, prev, h, mac, key_id in cur:
            if seq != expect:
                raise _Bad(expect, f"record {expect} is missing (next stored is {seq})")
            if prev != head:
                raise _Bad(seq, f"prev hash does not match the hash of seq {seq - 1}")
            if not isinstance(body, bytes) or not isinstance(h, bytes) \
                    or not isinstance(kind, str) or not isinstance(job_id, str | None):
                raise _Bad(seq, "a column has the wrong type")
            tail = suffixes.get((kind, job_id))
            if tail is None:
                tail = envelope_suffix(0, 0, kind, job_id).decode()
                tail = tail[:tail.rindex('"seq":') + 6]
                suffixes[(kind, job_id)] = tail
            if not body.endswith(f'{tail}{seq},"time_ns":{time_ns}}}'.encode()) \
                    or not body.startswith(b'{"body":'):
                raise _Bad(seq, "seq/time/kind/job columns do not match the hashed bytes")
            if sha256(prev + body).digest() != h:
                raise _Bad(seq, "hash does not match prev hash + stored bytes "
                           "(body or hash edited)")
            head = h
            if key_id is not None and key_id == fast_key_id and kind != "key" \
                    and mac is not None:
                if fast_key is not None and hmac_digest(fast_key, h, "sha256") != mac:
                    raise _Bad(seq, "MAC does not verify with the epoch "
                               f"{w.epoch} key")
            elif seq == 0 or kind in ("key", "genesis") or mac is not None \
                    or key_id is not None or w.hmac_id is not None:
                inner = _inner(seq, body) if seq == 0 or kind == "key" else None
                if seq == 0:
                    if kind != "genesis" or inner is None:
                        raise _Bad(0, "seq 0 is not a genesis record")
                    _genesis(w, inner)
                elif kind == "genesis":
                    raise _Bad(seq, "a second genesis record")
                if mac is not None or key_id is not None or w.hmac_id is not None:
                    _mac(w, seq, h, mac, key_id)
                if inner is not None and seq:
                    _key_record(w, seq, inner)
                fast_key_id = key_id if kind != "key" else None
                fast_key = w.keys.key(w.epoch) if w.keys is not None else None
            leaf = sha256(b"\x00" + body).digest()
            n = seq
            while n & 1:
                leaf = sha256(b"\x01" + fh.pop() + leaf).digest()
                n >>= 1
            fh.append(leaf)
            expect = seq + 1
            if expect in need:
                frontier.size = expect
                w.roots[expect] = (frontier.root(), h)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        raise _Bad(expect, f"SQLite cannot read the record: {exc}") from None
    finally:
        frontier.size = expect
    if expect == 0:
        raise _Bad(0, "record 0 is missing")
    w.count, w.head = expect, head


def _key_at(w: _Walk, size: int) -> Ed25519PublicKey | None:
    key = None
    for start, k in w.signing:
        if start <= size:
            key = k
    return key


def _check_checkpoint(w: _Walk, cp: Checkpoint, key: Ed25519PublicKey | None,
                      origin: str, label: str) -> None:
    if key is None:
        raise _Bad(None, f"{label}: ledger has no signing key to check it with")
    try:
        verify_checkpoint(cp, key, origin=origin)
    except (CheckpointInvalid, CheckpointError) as exc:
        raise _Bad(None, f"{label}: {exc.message}") from None
    if cp.size < 1:
        raise _Bad(None, f"{label}: covers no records")
    if cp.size > w.count:
        raise _Bad(w.count, f"ledger truncated: {label} covers {cp.size} records, "
                   f"the ledger holds {w.count}")
    root, head = w.roots[cp.size]
    if head.hex() != cp.head_hash:
        raise _Bad(cp.size - 1, f"record {cp.size - 1} differs from {label} "
                   "(rewritten, forked, or truncated and re-appended)")
    if root != cp.root:
        raise _Bad(cp.size - 1, f"Merkle root at size {cp.size} differs from {label}")


def verify_ledger(path: str | os.PathLike[str], hmac_key: bytes | None = None,
                  public_key: Ed25519PublicKey | None = None,
                  checkpoints: Iterable[str | Checkpoint] = ()) -> VerifyReport:
    """Verify one ledger file. Unusable input (missing, empty, not a ledger,
    unknown schema, wrong key) raises LedgerError/LedgerKeyError; a ledger that
    fails any check returns a report with ok=False, first_bad_seq and reason."""
    p = Path(path)
    kept = [c if isinstance(c, Checkpoint) else parse_checkpoint(c) for c in checkpoints]
    conn, meta = open_existing(p)
    try:
        if hmac_key is not None:
            if not meta.get("hmac_key_id"):
                raise LedgerKeyError(f"{p}: ledger was written without HMAC; no key applies")
            if hmac_key_id(hmac_key) != meta["hmac_key_id"]:
                raise LedgerKeyError(f"{p}: HMAC key {hmac_key_id(hmac_key)} is not this "
                                     f"ledger's key {meta['hmac_key_id']} (wrong key file?)")
        conn.execute("BEGIN")  # one read snapshot for rows, state and checkpoints
        stored = conn.execute("SELECT id, text FROM checkpoint ORDER BY id").fetchall()
        w = _Walk(meta, hmac_key, set())
        return _verify(conn, p, w, stored, kept=kept, public_key=public_key)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{p}: unreadable SQLite database: {exc}") from None
    finally:
        conn.close()


def _verify(conn: sqlite3.Connection, p: Path, w: _Walk, stored: list[Any], *,
            kept: list[Checkpoint], public_key: Ed25519PublicKey | None) -> VerifyReport:
    parsed: list[tuple[str, Checkpoint]] = []
    bad: _Bad | None = None
    for cid, text in stored:
        try:
            parsed.append((f"stored checkpoint #{cid}", parse_checkpoint(str(text))))
        except CheckpointError as exc:
            bad = bad or _Bad(None, f"stored checkpoint #{cid}: {exc.message}")
    w.need = {cp.size for _, cp in parsed} | {cp.size for cp in kept}
    try:
        _walk(conn, w)
        if bad is not None:
            raise bad
        origin = origin_for(w.meta["cluster"], w.meta["node"])
        for label, cp in parsed:
            _check_checkpoint(w, cp, _key_at(w, cp.size), origin, label)
    except _Bad as exc:
        bad = exc
    ids = tuple(signing_key_id(k) for _, k in w.signing)
    if bad is None and public_key is not None and signing_key_id(public_key) not in ids:
        raise LedgerKeyError(f"{p}: public key {signing_key_id(public_key)} is not a signing "
                             f"key of this ledger ({', '.join(ids) or 'none'})")
    if bad is None:
        try:
            for i, cp in enumerate(kept, 1):
                label = f"kept checkpoint {i} (size {cp.size})"
                _check_checkpoint(w, cp, _key_at(w, cp.size), origin, label)
            _check_state(conn, w)
            if conn.execute(SCHEMA_ROWS).fetchall() != expected_schema():
                raise _Bad(None, "table definitions differ from ledger schema version 1")
            problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise _Bad(None, f"SQLite integrity check failed: {problems[0]}")
        except _Bad as exc:
            bad = exc
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            bad = _Bad(None, f"SQLite cannot read the file: {exc}")
    return VerifyReport(
        path=str(p), ok=bad is None, count=w.count,
        head=w.head.hex() if w.count else None,
        first_bad_seq=bad.seq if bad else None, reason=bad.reason if bad else "",
        node=w.node, hmac_checked=w.keys is not None and bad is None,
        checkpoints_checked=len(parsed) + len(kept) if bad is None else 0, signing_keys=ids)


def _check_state(conn: sqlite3.Connection, w: _Walk) -> None:
    """The writer's saved tree frontier and epoch must agree with the records."""
    state = {str(k): bytes(v) for k, v in conn.execute("SELECT key, value FROM state")}
    if state.get("frontier") != w.frontier.to_bytes():
        raise _Bad(None, "saved Merkle frontier does not match the records")
    if w.hmac_id is None:
        return
    try:
        epoch = int(state["hmac_epoch"])
    except (KeyError, ValueError):
        raise _Bad(None, "saved HMAC epoch is missing or malformed") from None
    if epoch not in (w.epoch, w.epoch + 1 if w.sealed else w.epoch):
        raise _Bad(None, f"saved HMAC epoch {epoch} does not follow the records' epoch {w.epoch}")
    if w.keys is not None and state.get("hmac_key") != w.keys.key(epoch):
        raise _Bad(None, f"saved HMAC key is not the epoch {epoch} key")


def verify_files(ledgers: Sequence[str | os.PathLike[str]], key_file: str | None = None,
                 pubkey_file: str | None = None,
                 checkpoint_files: Sequence[str | os.PathLike[str]] = ()) -> list[VerifyReport]:
    """What `sparkctl verify` does: load the keys and kept checkpoints, verify each
    ledger. With one ledger every checkpoint applies to it; with several, each
    checkpoint applies to the ledger whose origin it names."""
    hmac_key = load_hmac_key(key_file) if key_file else None
    public_key = load_public_key(pubkey_file) if pubkey_file else None
    kept = [load_checkpoint(f) for f in checkpoint_files]
    if len(ledgers) == 1:
        return [verify_ledger(ledgers[0], hmac_key, public_key, kept)]
    origins = {}
    for path in ledgers:
        meta = ledger_meta(path)
        origins[str(path)] = origin_for(meta["cluster"], meta["node"])
    for f, cp in zip(checkpoint_files, kept, strict=True):
        if cp.origin not in origins.values():
            raise LedgerError(f"{f}: checkpoint is for {cp.origin}, which none of the "
                              "ledgers given is")
    return [verify_ledger(path, hmac_key, public_key,
                          [cp for cp in kept if cp.origin == origins[str(path)]])
            for path in ledgers]
