"""`sparkctl ledger export`: the records a node wrote after a given seq, in one small file.

The nightly collection ships only what the head node does not hold yet. A
segment is an SQLite file with the ledger's own `per` and `checkpoint` tables
(same columns, bytes copied unchanged) holding the rows with seq > AFTER and
the checkpoints that cover any of them, and a `meta` table naming the node and
the cut (docs/ledger-format.md, "Segments"). It proves nothing by itself: the
head node checks that its first record links to the chain it already holds,
then verifies every record and checkpoint as it would in a whole ledger.

It also carries what the witness needs without the node's history: the node's
newest checkpoint (even one that covers nothing new: a rolled-back node still
shows how small it now is), a consistency proof from the size the witness last
cosigned (`proof_from`) to that checkpoint, computed from the stored subtrees in
O(log n) reads, and the node's key rotation records, so the witness follows
signing keys. Neither needs trusting: the proof is checked against the witnessed
root, a rotation proves itself by the outgoing key's signature. The genesis row
rides along too, so merge knows who the node is as it would from the ledger.
Export reads the live ledger read-only in one snapshot, so the daemon is never
disturbed, and costs what the new rows cost.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from spark_slurm.errors import LedgerError
from spark_slurm.ledger.cut import cut_of

SEGMENT_FORMAT = "spark-slurm-segment"
SEGMENT_VERSION = 1
"""Still 1: the witness tables and meta keys are additions a version-1 reader ignores,
and a segment without them is read as one that carries no proof."""
_PER = ("seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL, job_id TEXT,"
        " body BLOB NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL, mac BLOB,"
        " key_id TEXT")
_COLS = "seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id"
_DDL = f"""
CREATE TABLE seg.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE seg.per ({_PER});
CREATE TABLE seg.checkpoint (id INTEGER PRIMARY KEY, size INTEGER NOT NULL,
    time_ns INTEGER NOT NULL, key_id TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE seg.genesis ({_PER});
CREATE TABLE seg.rotation ({_PER});
CREATE TABLE seg.proof (i INTEGER PRIMARY KEY, hash BLOB NOT NULL);
"""
_KEPT_META = ("node", "cluster", "created_ns", "epoch_seconds", "hmac_key_id",
              "schema_version")


@dataclass(frozen=True, slots=True)
class Segment:
    """What an export wrote."""

    path: str
    node: str
    after: int
    size: int  # records the node ledger held at export
    rows: int
    checkpoints: int
    bytes: int
    newest: int | None = None  # size of the node's newest checkpoint (None: it has none)
    proof_from: int | None = None  # the consistency proof carried runs proof_from..newest
    rotations: int = 0  # key records carried for the witness

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "node": self.node, "after": self.after, "size": self.size,
                "rows": self.rows, "checkpoints": self.checkpoints, "bytes": self.bytes,
                "newest_checkpoint": self.newest, "proof_from": self.proof_from,
                "rotations": self.rotations}


@dataclass(frozen=True, slots=True)
class WitnessPart:
    """What a segment carries for the witness (`read_witness_part`)."""

    checkpoint: str | None  # the node's newest checkpoint note
    proof_from: int | None  # `proof` runs from this size (None: no proof carried) ...
    proof_to: int | None  # ... to this one, the newest checkpoint's
    proof: list[bytes]
    rotations: list[tuple[int, bytes]] | None  # (seq, body) of key records; None: not carried


def segment_meta(meta: dict[str, str], path: Path) -> tuple[dict[str, str], int]:
    """A segment's meta table, checked, and the seq it starts after."""
    if meta.get("segment_version") != str(SEGMENT_VERSION):
        raise LedgerError(f"{path}: unknown segment version {meta.get('segment_version')!r} "
                          f"(this tool reads {SEGMENT_VERSION})")
    try:
        after = int(meta["after"])
        int(meta["size"])
    except (KeyError, ValueError):
        raise LedgerError(f"{path}: segment meta lacks a numeric after/size") from None
    if after < -1 or not meta.get("node"):
        raise LedgerError(f"{path}: segment meta names no node or a negative cut")
    return meta, after


def export_segment(ledger: str | os.PathLike[str], out: str | os.PathLike[str] | BinaryIO,
                   after: int, until: int | None = None, proof_from: int | None = None
                   ) -> Segment:
    """Write the rows of `ledger` with seq > `after` (-1: all of them), up to `until`
    when given (an archive of one range), and the checkpoints covering them, to
    `out`: a path (replaced atomically) or a binary stream (e.g. stdout, for
    `ssh node sparkctl ledger export ... --out -`). With `proof_from` (the size the
    witness last cosigned), also the consistency proof from there to the newest
    checkpoint, when that checkpoint is not smaller (a node rolled back below it
    gets none: the witness names the rollback from the checkpoint alone)."""
    from spark_slurm.ledger.schema import open_existing  # noqa: PLC0415 (keeps import light)

    if after < -1:
        raise LedgerError(f"--after {after}: a seq is -1 (everything) or more")
    if until is not None and until <= after:
        raise LedgerError(f"--until {until}: must come after --after {after}")
    if proof_from is not None and proof_from < 0:
        raise LedgerError(f"--proof-from {proof_from}: a tree size is 0 or more")
    last = 2**62 if until is None else until
    target = Path(out) if isinstance(out, (str, os.PathLike)) else None
    folder = target.parent if target is not None else None
    conn, meta = open_existing(ledger)
    cut = cut_of(meta, str(ledger))
    if cut is not None and after + 1 < cut.seq:
        conn.close()
        raise LedgerError(f"{ledger}: records before seq {cut.seq} were pruned (archived in "
                          f"{cut.archive_list}): export --after "
                          f"{cut.seq - 1} or later")
    try:
        fd, name = tempfile.mkstemp(prefix=".segment-", suffix=".db", dir=folder)
    except OSError as exc:
        conn.close()
        raise LedgerError(f"{target}: cannot write segment: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        conn.execute("ATTACH DATABASE ? AS seg", (f"{tmp.resolve().as_uri()}?mode=rw",))
        conn.execute("PRAGMA seg.journal_mode=OFF")
        conn.execute("PRAGMA seg.synchronous=OFF")
        conn.execute("BEGIN")
        for statement in _DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        row = conn.execute("SELECT max(seq) FROM per WHERE seq <= ?", (last,)).fetchone()
        size = 0 if row is None or row[0] is None else int(row[0]) + 1
        rows = conn.execute(f"INSERT INTO seg.per SELECT {_COLS} FROM main.per"  # noqa: S608
                            " WHERE seq > ? AND seq <= ? ORDER BY seq", (after, last)).rowcount
        # those written since the newest that covers nothing new (ids follow sizes):
        # the cost follows the new checkpoints, not every one the node ever wrote
        conn.execute("INSERT INTO seg.checkpoint SELECT id, size, time_ns, key_id, text"
                     " FROM main.checkpoint WHERE id > coalesce((SELECT id FROM"
                     " main.checkpoint WHERE size <= ?1 ORDER BY id DESC LIMIT 1), -1)"
                     " AND size > ?1 AND size <= ?2 ORDER BY id", (after + 1, last + 1))
        values = {k: meta[k] for k in _KEPT_META if k in meta}
        newest, proved, rotations = _witness_part(
            conn, size, proof_from, stored=int(meta.get("schema_version", "1")) >= 2)
        cps = int(conn.execute("SELECT count(*) FROM seg.checkpoint").fetchone()[0])
        if newest is not None:
            values["newest_checkpoint"] = str(newest)
        if proved is not None:
            values.update(proof_from=str(proved), proof_to=str(newest))
        values.update(format=SEGMENT_FORMAT, segment_version=str(SEGMENT_VERSION),
                      after=str(after), size=str(size))
        conn.executemany("INSERT INTO seg.meta VALUES (?, ?)", sorted(values.items()))
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE seg")
    except sqlite3.DatabaseError as exc:
        tmp.unlink(missing_ok=True)
        raise LedgerError(f"{ledger}: cannot export: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        conn.close()
    length = tmp.stat().st_size
    try:
        if target is not None:
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            tmp.replace(target)
        else:
            assert not isinstance(out, (str, os.PathLike))
            with tmp.open("rb") as fh:
                shutil.copyfileobj(fh, out)
            out.flush()
    except OSError as exc:
        raise LedgerError(f"{target or 'output'}: cannot write segment: "
                          f"{exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Segment(str(target) if target is not None else "-", meta.get("node", ""), after,
                   size, rows, cps, length, newest, proved, rotations)


def _witness_part(conn: sqlite3.Connection, size: int, proof_from: int | None, *,
                  stored: bool) -> tuple[int | None, int | None, int]:
    """Copy the genesis row, the key rotations and the newest checkpoint (within `size`)
    into the segment, and the consistency proof from `proof_from` to that checkpoint
    when it can be had: (newest checkpoint size, proof_from when proved, key records)."""
    from spark_slurm.ledger.tree import ledger_tree  # noqa: PLC0415 (only export needs it)

    conn.execute(f"INSERT INTO seg.genesis SELECT {_COLS} FROM main.per"  # noqa: S608
                 " WHERE seq = 0 AND kind = 'genesis'")
    # key records that may be rotations (the index finds the key records; the daily HMAC
    # epoch seals among them are left out): the witness parses and checks each anyway
    rotations = conn.execute(f"INSERT INTO seg.rotation SELECT {_COLS} FROM main.per"  # noqa: S608
                             " WHERE kind = 'key' AND seq < ? AND instr(body, 'rotate') > 0"
                             " ORDER BY seq", (size,)).rowcount
    conn.execute("INSERT OR IGNORE INTO seg.checkpoint SELECT id, size, time_ns, key_id, text"
                 " FROM main.checkpoint WHERE size <= ? ORDER BY id DESC LIMIT 1", (size,))
    row = conn.execute("SELECT size FROM seg.checkpoint ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return None, None, rotations
    newest = int(row[0])
    if proof_from is None or proof_from > newest:
        return newest, None, rotations
    try:
        proof = ledger_tree(conn, newest, stored=stored).consistency_proof(proof_from)
    except ValueError:  # it needs leaves a prune removed
        raise LedgerError(f"--proof-from {proof_from}: the proof needs records the ledger's "
                          "cut removed (the witness's last size is older than the cut)") from None
    conn.executemany("INSERT INTO seg.proof VALUES (?, ?)", enumerate(proof))
    return newest, proof_from, rotations


def read_witness_part(path: Path) -> WitnessPart:
    """The witness's share of a segment: its newest checkpoint, the proof and the key
    records (a segment written before they were carried has neither: `rotations` None)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot open as SQLite: {exc}") from None
    try:
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        if meta.get("format") != SEGMENT_FORMAT:
            raise LedgerError(f"{path}: not a segment")
        segment_meta(meta, path)
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master"
                                                   " WHERE type = 'table'")}
        row = conn.execute("SELECT text FROM checkpoint ORDER BY id DESC LIMIT 1").fetchone()
        text = None if row is None else str(row[0])
        proof: list[bytes] = []
        proof_from = proof_to = None
        if "proof" in tables and "proof_from" in meta:
            try:
                proof_from, proof_to = int(meta["proof_from"]), int(meta["proof_to"])
            except (KeyError, ValueError):
                raise LedgerError(f"{path}: segment meta proof_from/proof_to are not "
                                  "numbers") from None
            proof = [bytes(h) if isinstance(h, bytes) else b""
                     for (h,) in conn.execute("SELECT hash FROM proof ORDER BY i")]
        rotations = None
        if "rotation" in tables:
            rotations = [(int(seq), bytes(body)) for seq, body in conn.execute(
                "SELECT seq, CAST(body AS BLOB) FROM rotation ORDER BY seq")]
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: unreadable segment: {exc}") from None
    finally:
        conn.close()
    return WitnessPart(text, proof_from, proof_to, proof, rotations)
