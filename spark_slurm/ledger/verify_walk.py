"""One sequential pass over a ledger's rows, and the per-record state machine.

`walk` is the reference: it names the first bad seq. The parallel verifier
(verify_par) runs the same per-row checks in chunks and feeds only the rare rows
that move state (genesis, key records, epoch changes) through `slow_row` here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spark_slurm.errors import LedgerKeyError
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.checkpoint import origin_for
from spark_slurm.ledger.keys import public_from_raw, signing_key_id
from spark_slurm.ledger.merkle import Frontier
from spark_slurm.ledger.records import GENESIS_PREV, envelope_suffix
from spark_slurm.ledger.schema import FORMAT, SCHEMA_VERSION
from spark_slurm.ledger.store import rotation_message


class Bad(Exception):
    """A verification failure: the first bad seq (or None) and why."""

    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class Walk:
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
        # PRAGMA integrity_check rows (or its error) when already run alongside the walk
        self.integrity: list[str] | Exception | None = None


def _genesis(w: Walk, body: dict[str, Any]) -> None:
    if body.get("format") != FORMAT or body.get("schema_version") != SCHEMA_VERSION:
        raise Bad(0, "genesis record does not name this ledger format and schema version")
    for key in ("node", "cluster"):
        if body.get(key) != w.meta.get(key):
            raise Bad(0, f"genesis {key} {body.get(key)!r} differs from the file's meta table")
    if str(body.get("created_ns")) != w.meta.get("created_ns") or \
            str(body.get("epoch_seconds")) != w.meta.get("epoch_seconds"):
        raise Bad(0, "genesis created_ns/epoch_seconds differ from the file's meta table")
    if (body.get("hmac_key_id") or "") != w.meta.get("hmac_key_id", ""):
        raise Bad(0, "genesis hmac_key_id differs from the file's meta table")
    w.node = str(body["node"])
    w.hmac_id = body.get("hmac_key_id")
    pub = body.get("signing_public_key")
    if pub is not None:
        try:
            signer = public_from_raw(base64.b64decode(str(pub), validate=True))
        except (ValueError, LedgerKeyError):
            raise Bad(0, "genesis signing public key is malformed") from None
        if signing_key_id(signer) != body.get("signing_key_id"):
            raise Bad(0, "genesis signing_key_id does not match its public key")
        w.signing.append((1, signer))


def _key_record(w: Walk, seq: int, body: dict[str, Any]) -> None:
    event = body.get("event")
    if event == "seal":
        if w.hmac_id is None or body.get("key_id") != w.hmac_id or body.get("epoch") != w.epoch:
            raise Bad(seq, f"seal record does not seal the current epoch {w.epoch}")
        w.sealed = True
    elif event == "rotate":
        if not w.signing:
            raise Bad(seq, "key rotation in a ledger that has no signing key")
        try:
            raw = base64.b64decode(body["public_key"], validate=True)
            new = public_from_raw(raw)
            w.signing[-1][1].verify(base64.b64decode(body["endorsement"], validate=True),
                                    rotation_message(origin_for(w.meta["cluster"],
                                                                w.meta["node"]), raw))
        except (KeyError, ValueError, TypeError, LedgerKeyError, InvalidSignature):
            raise Bad(seq, "key rotation is not endorsed by the outgoing signing key") from None
        if body.get("key_id") != signing_key_id(raw):
            raise Bad(seq, "key rotation names a key id that is not its public key's")
        w.signing.append((seq + 1, new))


def _mac(w: Walk, seq: int, h: bytes, mac: bytes | None, key_id: str | None) -> None:
    if w.hmac_id is None:
        if mac is not None or key_id is not None:
            raise Bad(seq, "record carries a MAC in a ledger created without HMAC")
        return
    parsed = hmac_epochs.parse_key_id(key_id) if isinstance(key_id, str) else None
    if parsed is None or parsed[0] != w.hmac_id or mac is None:
        raise Bad(seq, "record has no MAC or a malformed key id")
    epoch = parsed[1]
    if seq == 0:
        if epoch != 0:
            raise Bad(0, "genesis record is not in epoch 0")
    elif epoch == w.epoch + 1 and w.sealed:
        w.epoch, w.sealed = epoch, False
    elif epoch != w.epoch:
        raise Bad(seq, f"record in epoch {epoch} follows epoch {w.epoch}"
                   + (" which was not sealed" if epoch == w.epoch + 1 else ""))
    elif w.sealed:
        raise Bad(seq, f"record in epoch {epoch} after that epoch was sealed")
    if w.keys is not None and hmac_epochs.mac(w.keys.key(epoch), h) != mac:
        raise Bad(seq, f"MAC does not verify with the epoch {epoch} key")


def _inner(seq: int, body: bytes) -> dict[str, Any]:
    try:
        inner = json.loads(body)["body"]
    except (ValueError, KeyError, TypeError):
        raise Bad(seq, "stored bytes are not a JSON envelope") from None
    if not isinstance(inner, dict):
        raise Bad(seq, "stored bytes hold no body object")
    return inner


def walk(conn: sqlite3.Connection, w: Walk) -> None:
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
                raise Bad(expect, f"record {expect} is missing (next stored is {seq})")
            if prev != head:
                raise Bad(seq, f"prev hash does not match the hash of seq {seq - 1}")
            if not isinstance(body, bytes) or not isinstance(h, bytes) \
                    or not isinstance(kind, str) or not isinstance(job_id, str | None):
                raise Bad(seq, "a column has the wrong type")
            tail = suffixes.get((kind, job_id))
            if tail is None:
                tail = envelope_suffix(0, 0, kind, job_id).decode()
                tail = tail[:tail.rindex('"seq":') + 6]
                suffixes[(kind, job_id)] = tail
            if not body.endswith(f'{tail}{seq},"time_ns":{time_ns}}}'.encode()) \
                    or not body.startswith(b'{"body":'):
                raise Bad(seq, "seq/time/kind/job columns do not match the hashed bytes")
            if sha256(prev + body).digest() != h:
                raise Bad(seq, "hash does not match prev hash + stored bytes "
                           "(body or hash edited)")
            head = h
            if key_id is not None and key_id == fast_key_id and kind != "key" \
                    and mac is not None:
                if fast_key is not None and hmac_digest(fast_key, h, "sha256") != mac:
                    raise Bad(seq, "MAC does not verify with the epoch "
                               f"{w.epoch} key")
            elif seq == 0 or kind in ("key", "genesis") or mac is not None \
                    or key_id is not None or w.hmac_id is not None:
                slow_row(w, (seq, kind, body, h, mac, key_id))
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
        raise Bad(expect, f"SQLite cannot read the record: {exc}") from None
    finally:
        frontier.size = expect
    if expect == 0:
        raise Bad(0, "record 0 is missing")
    w.count, w.head = expect, head




def slow_row(w: Walk, row: tuple[int, str, bytes, bytes, bytes | None, str | None]) -> None:
    """The careful path for genesis, key records and epoch changes (state moves);
    `row` is (seq, kind, stored bytes, hash, mac, key id)."""
    seq, kind, body, h, mac, key_id = row
    inner = _inner(seq, body) if seq == 0 or kind == "key" else None
    if seq == 0:
        if kind != "genesis" or inner is None:
            raise Bad(0, "seq 0 is not a genesis record")
        _genesis(w, inner)
    elif kind == "genesis":
        raise Bad(seq, "a second genesis record")
    if mac is not None or key_id is not None or w.hmac_id is not None:
        _mac(w, seq, h, mac, key_id)
    if inner is not None and seq:
        _key_record(w, seq, inner)
