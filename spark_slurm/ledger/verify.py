"""Verify a ledger file from its bytes alone, naming the first record that fails.

Checks, in one pass over the rows in seq order: seq contiguity, the previous-hash
link, the columns against the hashed envelope, the hash, the HMAC and epoch seal
structure (when the ledger uses HMAC), signing-key rotations, then every
checkpoint kept in the file and every checkpoint given by the caller, the saved
writer state and the stored Merkle subtrees. Never re-serialises: it hashes
exactly the stored bytes. Rows are streamed in pages and the tree is kept as a
compact range, so memory does not grow with the ledger. Large ledgers are
scanned on every CPU (verify_par), small ones in-process (verify_walk): the
same scan either way, so the first bad seq named is the same.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from spark_slurm.errors import CheckpointError, CheckpointInvalid, LedgerError, LedgerKeyError
from spark_slurm.ledger.checkpoint import (
    Checkpoint,
    load_checkpoint,
    origin_for,
    parse_checkpoint,
    verify_checkpoint,
)
from spark_slurm.ledger.cut import Cut, cut_of
from spark_slurm.ledger.keys import (
    hmac_key_id,
    load_hmac_key,
    load_public_key,
    signing_key_id,
)
from spark_slurm.ledger.reader import ledger_meta
from spark_slurm.ledger.scan_worker import subtree_digest
from spark_slurm.ledger.schema import (
    INGEST_SOURCES,
    SCHEMA_ROWS,
    expected_schema,
    open_existing,
    schema_version,
)
from spark_slurm.ledger.verify_par import walk_parallel
from spark_slurm.ledger.verify_walk import Bad, Walk, walk


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
    first_seq: int = 0
    """0, or the cut of a pruned ledger: records before it (but the few kept) are gone."""
    parallel: bool = False
    """Worker processes walked the chain (a ledger of at least two chunks, more than one
    CPU, a cut on the chunk grid); False on a big ledger is why a verify is slow."""

    def summary(self) -> str:
        """One line for people: what was verified, or where and why it failed."""
        if self.ok:
            pruned = f" (pruned before seq {self.first_seq})" if self.first_seq else ""
            return (f"{self.path}: ok, {self.count} records{pruned}, head {self.head}, "
                    f"{self.checkpoints_checked} checkpoints"
                    + (", HMAC verified" if self.hmac_checked else ""))
        where = f"first bad seq {self.first_bad_seq}: " if self.first_bad_seq is not None else ""
        return f"{self.path}: {where}{self.reason}"


def _key_at(w: Walk, size: int) -> Ed25519PublicKey | None:
    key = None
    for start, k in w.signing:
        if start <= size:
            key = k
    return key


def _check_checkpoint(w: Walk, cp: Checkpoint, key: Ed25519PublicKey | None,
                      origin: str, label: str) -> None:
    if cp.size < 1:  # first: no key signs a tree of size 0 (keys start at record 1)
        raise Bad(None, f"{label}: covers no records")
    if key is None:
        raise Bad(None, f"{label}: ledger has no signing key to check it with")
    try:
        verify_checkpoint(cp, key, origin=origin)
    except (CheckpointInvalid, CheckpointError) as exc:
        raise Bad(None, f"{label}: {exc.message}") from None
    if cp.size > w.count:
        raise Bad(w.count, f"ledger truncated: {label} covers {cp.size} records, "
                   f"the ledger holds {w.count}")
    root, head = w.roots[cp.size]
    if head.hex() != cp.head_hash:
        raise Bad(cp.size - 1, f"record {cp.size - 1} differs from {label} "
                   "(rewritten, forked, or truncated and re-appended)")
    if root != cp.root:
        raise Bad(cp.size - 1, f"Merkle root at size {cp.size} differs from {label}")


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
        unreadable = None
        try:
            stored = conn.execute("SELECT id, text, size, time_ns, key_id FROM checkpoint "
                                  "ORDER BY id").fetchall()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:  # a damaged table
            stored, unreadable = [], Bad(None, f"SQLite cannot read the checkpoints: {exc}")
        try:
            cut = cut_of(dict(conn.execute("SELECT key, value FROM meta WHERE key = 'cut'")),
                         str(p))
        except LedgerError as exc:  # an edited cut is a failed check, not unusable input
            return VerifyReport(path=str(p), ok=False, count=0, head=None,
                                reason=exc.message.removeprefix(f"{p}: "), node=meta.get("node"))
        for i, cp in enumerate(kept, 1):
            if cut is not None and cp.size < cut.seq:
                raise LedgerError(f"{p}: kept checkpoint {i} (size {cp.size}) is before the "
                                  f"ledger's cut at seq {cut.seq}: check it against the archive")
        w = Walk(meta, hmac_key, set())
        return _verify(conn, p, w, stored, kept=kept, public_key=public_key,
                       bad=unreadable, cut=cut)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{p}: unreadable SQLite database: {exc}") from None
    finally:
        conn.close()


def _verify(conn: sqlite3.Connection, p: Path, w: Walk, stored: list[Any], *,
            kept: list[Checkpoint], public_key: Ed25519PublicKey | None,
            bad: Bad | None = None, cut: Cut | None = None) -> VerifyReport:
    parsed: list[tuple[str, Checkpoint]] = []
    columns: list[tuple[str, Any, Any, Any]] = []
    for cid, text, size, time_ns, key_id in stored:
        try:
            cp = parse_checkpoint(str(text))
        except CheckpointError as exc:
            bad = bad or Bad(None, f"stored checkpoint #{cid}: {exc.message}")
            continue
        if cut is not None and cp.size < cut.seq:
            bad = bad or Bad(None, f"stored checkpoint #{cid} (size {cp.size}) is before the "
                             f"cut at seq {cut.seq}")
            continue
        parsed.append((f"stored checkpoint #{cid}", cp))
        columns.append((f"stored checkpoint #{cid}", size, time_ns, key_id))
    w.need = {cp.size for _, cp in parsed} | {cp.size for cp in kept}
    if cut is not None and not parsed and not kept:  # a prune leaves one at or after the cut
        bad = bad or Bad(None, f"no checkpoint covers the cut at seq {cut.seq}: nothing "
                         "anchors the records pruned before it")
    try:
        if not walk_parallel(conn, p, w, w.keys.key(0) if w.keys is not None else None,
                             cut=cut):
            walk(conn, w, cut)
        if bad is not None:
            raise bad
        origin = origin_for(w.meta["cluster"], w.meta["node"])
        for label, cp in parsed:
            _check_checkpoint(w, cp, _key_at(w, cp.size), origin, label)
        _check_columns(w, [cp for _, cp in parsed], columns)
    except Bad as exc:
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
            version = schema_version(w.meta)
            if conn.execute(SCHEMA_ROWS).fetchall() != expected_schema(version):
                raise Bad(None, f"table definitions differ from ledger schema version {version}")
            if version >= 2:
                _check_latest(conn, w)
                _check_tree(conn, w)
            problems = _integrity(conn, w)
            if problems != ["ok"]:
                raise Bad(None, f"SQLite integrity check failed: {problems[0]}")
        except Bad as exc:
            bad = exc
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            bad = Bad(None, f"SQLite cannot read the file: {exc}")
    return VerifyReport(
        path=str(p), ok=bad is None, count=w.count,
        head=w.head.hex() if w.count else None,
        first_bad_seq=bad.seq if bad else None, reason=bad.reason if bad else "",
        node=w.node, hmac_checked=w.keys is not None and bad is None,
        checkpoints_checked=len(parsed) + len(kept) if bad is None else 0, signing_keys=ids,
        first_seq=0 if cut is None else cut.seq, parallel=w.parallel)


def _check_columns(w: Walk, cps: list[Checkpoint], columns: list[tuple[str, Any, Any, Any]]
                   ) -> None:
    """A stored checkpoint's size and key id columns (readers pick checkpoints by
    them) must agree with its signed note and the key in force; its time (unsigned,
    informational: a clock may step back) must at least be an integer."""
    for cp, (label, size, time_ns, key_id) in zip(cps, columns, strict=True):
        key = _key_at(w, cp.size)
        if size != cp.size or type(time_ns) is not int or key is None \
                or key_id != signing_key_id(key):
            raise Bad(None, f"{label}: its size/time/key id columns do not match its "
                      "signed note")


def _integrity(conn: sqlite3.Connection, w: Walk) -> list[str]:
    """PRAGMA integrity_check's rows, from the parallel walk when it ran it already."""
    got = w.integrity
    if got is None:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    if isinstance(got, Exception):
        raise got
    return got


def _check_state(conn: sqlite3.Connection, w: Walk) -> None:
    """The writer's saved tree frontier and epoch must agree with the records."""
    # a value of another type (an edit, an older writer) is compared as its text, not
    # a crash: bytes() of a str raises, and of an int makes that many zero bytes
    state = {str(k): v if isinstance(v, bytes) else str(v).encode()
             for k, v in conn.execute("SELECT key, value FROM state")}
    if state.get("frontier") != w.chain.to_bytes():
        raise Bad(None, "saved Merkle frontier does not match the records")
    if w.hmac_id is None:
        return
    try:
        epoch = int(state["hmac_epoch"])
    except (KeyError, ValueError):
        raise Bad(None, "saved HMAC epoch is missing or malformed") from None
    if epoch not in (w.epoch, w.epoch + 1 if w.sealed else w.epoch):
        raise Bad(None, f"saved HMAC epoch {epoch} does not follow the records' epoch {w.epoch}")
    if w.keys is not None and state.get("hmac_key") != w.keys.key(epoch):
        raise Bad(None, f"saved HMAC key is not the epoch {epoch} key")


def _check_tree(conn: sqlite3.Connection, w: Walk) -> None:
    """The stored Merkle subtrees (what inclusion proofs are built from) must be
    exactly those of the records: compared as a multiset hash, streamed."""
    count, total = 0, 0
    for level, idx, h in conn.execute("SELECT level, idx, CAST(hash AS BLOB) FROM tree"):
        if type(level) is not int or type(idx) is not int or not isinstance(h, bytes):
            raise Bad(None, "stored Merkle subtrees do not match the records")
        count += 1
        total += subtree_digest(level, idx, h)
    if (count, total % 2**256) != w.subtrees:
        raise Bad(None, "stored Merkle subtrees do not match the records")


def _check_latest(conn: sqlite3.Connection, w: Walk) -> None:
    """`state.latest.<source>` must name each ingest source's newest record (sparkd's
    ingest cursors start from it), and be absent for a source with no record."""
    state = {str(k): v for k, v in conn.execute(
        "SELECT key, value FROM state WHERE key LIKE 'latest.%'")}
    for source in INGEST_SOURCES:
        got = state.pop(f"latest.{source}", None)
        want = w.latest.get(source)
        if (None if got is None else bytes(got) if isinstance(got, bytes) else str(got).encode()
                ) != (None if want is None else str(want).encode()):
            raise Bad(None, f"saved newest {source} record does not match the records")
    if state:
        raise Bad(None, f"unknown saved state {sorted(state)[0]!r}")


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
