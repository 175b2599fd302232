"""The verifier's state machine, and the sequential walk over a whole ledger.

`walk` runs the one per-record scan (`scan_worker.Scan`: chain, Merkle tree,
columns, MACs) over every row in-process and feeds the rare rows that move state
(genesis, key records, epoch changes) through `slow_row` here, page by page, so
the first bad seq is named. The parallel verifier (verify_par) runs the same
scan on chunks in worker processes and feeds `slow_row` the same rows.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spark_slurm.errors import LedgerKeyError
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.chain import GENESIS_PREV, Chain, fold
from spark_slurm.ledger.checkpoint import origin_for
from spark_slurm.ledger.cut import MIN_ALIGN, Cut, CutProblem, check_subtrees, kept_rows, root_at
from spark_slurm.ledger.keys import public_from_raw, signing_key_id
from spark_slurm.ledger.merkle import leaf_hash, verify_inclusion
from spark_slurm.ledger.scan_worker import Scan, Special, subtree_digest
from spark_slurm.ledger.schema import FORMAT, SCHEMA_VERSIONS
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
        self.chain = Chain()  # after the walk: the compact range over every record
        self.need = need  # tree sizes whose root and head we must remember
        self.roots: dict[int, tuple[bytes, bytes]] = {}
        self.subtrees = (0, 0)  # count and multiset hash of the stored subtrees expected
        self.latest: dict[str, int] = {}  # ingest source -> seq of its newest record
        self.epoch = 0
        self.sealed = False
        self.signing: list[tuple[int, Ed25519PublicKey]] = []  # (from tree size, key)
        self.node: str | None = None
        # PRAGMA integrity_check rows (or its error) when already run alongside the walk
        self.integrity: list[str] | Exception | None = None
        self.parallel = False  # worker processes judged the chain (walk_parallel)


def _genesis(w: Walk, body: dict[str, Any]) -> None:
    version = body.get("schema_version")
    if body.get("format") != FORMAT or version not in SCHEMA_VERSIONS \
            or version > int(w.meta.get("schema_version", 0)):
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


def walk(conn: sqlite3.Connection, w: Walk, cut: Cut | None = None) -> None:
    """Check every record in seq order (in this process) and fill `w`; raises Bad
    naming the first bad seq. A pruned ledger is checked below its cut first
    (`walk_below`), then scanned on from the cut."""
    hmac_id = w.meta.get("hmac_key_id") or None  # the genesis must agree (slow_row, seq 0)

    def special(rows: list[Special]) -> None:
        for row in rows:
            slow_row(w, row)

    below, below_sum = 0, 0
    if cut is None:
        scan = Scan(conn, 0, GENESIS_PREV, hmac_id=hmac_id,
                    k0=w.keys.key(0) if w.keys else None, need=sorted(w.need),
                    on_special=special)
    else:
        at_cut, below, below_sum = walk_below(conn, w, cut)
        scan = Scan(conn, cut.seq, at_cut.head, hmac_id=hmac_id,
                    k0=w.keys.key(0) if w.keys else None, need=(), on_special=special)
        at_cut.marks, at_cut.subtrees = frozenset(w.need), []
        scan.chain = at_cut
        if cut.seq in w.need:  # a checkpoint right at the cut
            w.roots[cut.seq] = (at_cut.root(), at_cut.head)
    latest = dict(w.latest)
    bad = scan.run(2**62)
    if bad is not None:
        raise Bad(*bad)
    chain = scan.chain
    if chain.size == 0:
        raise Bad(0, "record 0 is missing")
    w.count, w.head, w.chain = chain.size, chain.head, chain
    w.roots.update((size, (fold(hashes), h)) for size, (hashes, h) in chain.marked.items())
    w.subtrees = (scan.subtree_count + below, (scan.subtree_sum + below_sum) % 2**256)
    w.latest = {**latest, **scan.latest}


def walk_below(conn: sqlite3.Connection, w: Walk, cut: Cut) -> tuple[Chain, int, int]:
    """A pruned ledger below its cut (see ledger/cut.py): the stored subtrees checked
    top down, and each record kept there scanned as every record is (columns, hash,
    MAC, and through `slow_row` the genesis and key records, in seq order) and proven
    in the tree of its cut. Returns the chain standing at the cut (record cut.seq's
    prev hash as head: the links after it prove it), and the count and digest sum of
    the subtrees below it. Records w.latest for the kept ingest records."""
    hmac_id = w.meta.get("hmac_key_id") or None

    def special(rows: list[Special]) -> None:
        for row in rows:
            slow_row(w, row)

    try:
        compact, count, seen = check_subtrees(conn, cut.seq)
        roots = {cut.seq: fold(compact)}  # older cuts' roots are read when a proof needs one
        for seq in kept_rows(conn, cut):
            size, proof = cut.kept[seq]
            if size % MIN_ALIGN or not seq < size <= cut.seq:
                raise Bad(seq, f"record {seq} is proven at tree size {size}, which is no cut")
            prev, body = conn.execute("SELECT CAST(prev_hash AS BLOB), CAST(body AS BLOB)"
                                      " FROM per WHERE seq = ?", (seq,)).fetchone()
            scan = Scan(conn, seq, GENESIS_PREV if seq == 0 or not isinstance(prev, bytes)
                        else prev, hmac_id=hmac_id, k0=w.keys.key(0) if w.keys else None,
                        need=(), on_special=special)
            bad = scan.run(seq + 1)
            if bad is not None:
                raise Bad(*bad)
            w.latest.update(scan.latest)
            if size not in roots:
                roots[size] = root_at(conn, size)
            if not verify_inclusion(leaf_hash(body), seq, size, proof, roots[size]):
                raise Bad(seq, f"record {seq}, kept below the cut at seq {cut.seq}, is not "
                          f"in the Merkle tree of its cut (size {size})")
        first = conn.execute("SELECT CAST(prev_hash AS BLOB) FROM per WHERE seq = ?",
                             (cut.seq,)).fetchone()
    except CutProblem as exc:
        raise Bad(exc.seq, exc.reason) from None
    if first is None or not isinstance(first[0], bytes):
        raise Bad(cut.seq, f"record {cut.seq}, the first after the cut, is missing")
    return (Chain(cut.seq, compact, first[0]), count,
            sum(subtree_digest(*s) for s in seen) % 2**256)


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
