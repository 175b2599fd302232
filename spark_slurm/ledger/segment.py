"""`sparkctl ledger export`: the records a node wrote after a given seq, in one small file.

The nightly collection ships only what the head node does not hold yet. A
segment is an SQLite file with the ledger's own `per` and `checkpoint` tables
(same columns, bytes copied unchanged) holding the rows with seq > AFTER and
the checkpoints that cover any of them, and a `meta` table naming the node and
the cut (docs/ledger-format.md, "Segments"). It proves nothing by itself: the
head node checks that its first record links to the chain it already holds,
then verifies every record and checkpoint as it would in a whole ledger.
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

SEGMENT_FORMAT = "spark-slurm-segment"
SEGMENT_VERSION = 1
_DDL = """
CREATE TABLE seg.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE seg.per (seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    job_id TEXT, body BLOB NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL, mac BLOB,
    key_id TEXT);
CREATE TABLE seg.checkpoint (id INTEGER PRIMARY KEY, size INTEGER NOT NULL,
    time_ns INTEGER NOT NULL, key_id TEXT NOT NULL, text TEXT NOT NULL);
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

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "node": self.node, "after": self.after, "size": self.size,
                "rows": self.rows, "checkpoints": self.checkpoints, "bytes": self.bytes}


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
                   after: int, until: int | None = None) -> Segment:
    """Write the rows of `ledger` with seq > `after` (-1: all of them), up to `until`
    when given (an archive of one range), and the checkpoints covering them, to
    `out`: a path (replaced atomically) or a binary stream (e.g. stdout, for
    `ssh node sparkctl ledger export ... --out -`)."""
    from spark_slurm.ledger.schema import open_existing  # noqa: PLC0415 (keeps import light)

    if after < -1:
        raise LedgerError(f"--after {after}: a seq is -1 (everything) or more")
    if until is not None and until <= after:
        raise LedgerError(f"--until {until}: must come after --after {after}")
    last = 2**62 if until is None else until
    target = Path(out) if isinstance(out, (str, os.PathLike)) else None
    folder = target.parent if target is not None else None
    conn, meta = open_existing(ledger)
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
        rows = conn.execute("INSERT INTO seg.per SELECT seq, time_ns, kind, job_id, body,"
                            " prev_hash, hash, mac, key_id FROM main.per WHERE seq > ? AND"
                            " seq <= ? ORDER BY seq", (after, last)).rowcount
        # those written since the newest that covers nothing new (ids follow sizes):
        # the cost follows the new checkpoints, not every one the node ever wrote
        cps = conn.execute("INSERT INTO seg.checkpoint SELECT id, size, time_ns, key_id, text"
                           " FROM main.checkpoint WHERE id > coalesce((SELECT id FROM"
                           " main.checkpoint WHERE size <= ?1 ORDER BY id DESC LIMIT 1), -1)"
                           " AND size > ?1 AND size <= ?2 ORDER BY id",
                           (after + 1, last + 1)).rowcount
        values = {k: meta[k] for k in _KEPT_META if k in meta}
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
                   size, rows, cps, length)
