"""What merge reads from a node: a whole ledger snapshot or an exported segment.

Merge reads only the records past what the head node already holds. In one read
snapshot of the source it takes the node's size, the hash at the last seq both
sides have, and copies the new rows and the checkpoints that cover them into a
private file in a directory only the merging user can write. The check and the
store both read that copy, so a source swapped or edited while the merge runs
cannot slip rows in between; and the copy costs what the new rows cost, never
the node's whole history. The verifier writes each checked row's Merkle leaf
(and the `ref.seq` audit indexes) into the copy's `leaf` table, and the cluster
store takes the rows from there in one `INSERT ... SELECT` (or COPY).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from spark_slurm.errors import LedgerError, SparkError
from spark_slurm.head.scan import RawRecord
from spark_slurm.ledger.schema import check_file, connect, open_existing, read_meta
from spark_slurm.ledger.segment import SEGMENT_FORMAT, segment_meta

PAGE = 4096  # rows per verification page: bounded memory whatever the ledger size

_COLUMNS = ("seq, time_ns, kind, job_id, CAST(body AS BLOB), CAST(prev_hash AS BLOB),"
            " CAST(hash AS BLOB), CAST(mac AS BLOB), key_id")
_COPY_DDL = """
CREATE TABLE cp.per (seq INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    job_id TEXT, body BLOB NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL, mac BLOB,
    key_id TEXT);
CREATE TABLE cp.checkpoint (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE cp.leaf (seq INTEGER PRIMARY KEY, leaf BLOB NOT NULL, ref_seq INTEGER);
"""


@dataclass(frozen=True, slots=True)
class Source:
    """One merge argument, opened: what kind of file, whose, and where it starts."""

    arg: str
    path: Path
    expected: str | None
    kind: str  # "ledger" or "segment"
    meta: dict[str, str]
    genesis: RawRecord | None
    after: int  # a segment holds the rows after this seq (-1: from genesis)

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class Snapshot:
    """What one read snapshot of a source gave: the node's size, the source's hash at
    the seq asked for, and the private copy of the rows from `first` on (None when
    there were none to copy)."""

    size: int
    hash_at: bytes | None
    copy: Path | None
    rows: int
    first: int


def split_arg(arg: str) -> tuple[str | None, Path]:
    """`NODE=PATH` pins the node a file must belong to; a bare PATH trusts its genesis."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(arg)


def open_source(arg: str) -> Source:
    """Open a merge argument (node ledger snapshot or segment) and read who it is."""
    expected, path = split_arg(arg)
    if not check_file(path, allow_empty=False):
        raise LedgerError(f"{path}: no such ledger file")
    conn = connect(path, readonly=True)
    try:
        raw_meta = _meta_rows(conn, path)
        if raw_meta.get("format") == SEGMENT_FORMAT:
            meta, after = segment_meta(raw_meta, path)
            kind = "segment"
        else:
            meta, after, kind = read_meta(conn, path), -1, "ledger"
        row = _fetch_one(conn, f"SELECT {_COLUMNS} FROM per WHERE seq = 0",  # noqa: S608
                         (), path)
        genesis = None if row is None else RawRecord._make(row)
    finally:
        conn.close()
    return Source(arg, path, expected, kind, meta, genesis, after)


def _meta_rows(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    except (sqlite3.DatabaseError, UnicodeDecodeError):
        return dict(read_meta(conn, path))  # raises the ledger's own clear error


def _fetch_one(conn: sqlite3.Connection, sql: str, args: tuple[object, ...], path: Path
               ) -> tuple[object, ...] | None:
    try:
        row = conn.execute(sql, args).fetchone()
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: unreadable ledger: {exc}") from None
    return None if row is None else tuple(row)


def snapshot(source: Source, first: int, hash_seq: int | None, workdir: Path) -> Snapshot:
    """In one read snapshot of the source: its size (newest seq + 1; for a segment,
    the size the node had at export when it holds no newer row), the hash at
    `hash_seq` (or at its last seq, when it ends before), and a private copy of the
    rows from `first` on with the checkpoints covering any of them. No copy is made
    when there is nothing from `first` on."""
    conn = connect(source.path, readonly=True)
    copy: Path | None = None
    try:
        snap = _read(conn, source, first, hash_seq, copy=False)
        if snap.rows:  # SQLite attaches only outside a transaction: read again with it
            copy = _new_copy(workdir)
            conn.execute("ATTACH DATABASE ? AS cp", (f"{copy.resolve().as_uri()}?mode=rw",))
            conn.execute("PRAGMA cp.journal_mode=OFF")
            conn.execute("PRAGMA cp.synchronous=OFF")
            snap = _read(conn, source, first, hash_seq, copy=True)
            snap.copy = copy
    except sqlite3.DatabaseError as exc:
        discard(copy)
        raise LedgerError(f"{source.path}: cannot read the ledger: {exc}") from None
    except BaseException:
        discard(copy)
        raise
    finally:
        conn.close()
    if snap.copy is None:
        discard(copy)
    return snap


def _read(conn: sqlite3.Connection, source: Source, first: int, hash_seq: int | None, *,
          copy: bool) -> Snapshot:
    conn.execute("BEGIN")
    try:
        last = _fetch_one(conn, "SELECT max(seq) FROM per", (), source.path)
        size = 0 if last is None or last[0] is None else int(str(last[0])) + 1
        if source.kind == "segment":
            size = max(size, int(source.meta.get("size", "0")))
        value = None
        if hash_seq is not None and min(hash_seq, size - 1) >= 0:
            row = _fetch_one(conn, "SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?",
                             (min(hash_seq, size - 1),), source.path)
            value = None if row is None or not isinstance(row[0], bytes) else row[0]
        if not copy:
            found = _fetch_one(conn, "SELECT count(*) FROM (SELECT 1 FROM per WHERE seq >= ?"
                               " LIMIT 1)", (first,), source.path)
            return Snapshot(size, value, None, int(str(found[0])) if found else 0, first)
        for statement in _COPY_DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        rows = conn.execute("INSERT INTO cp.per SELECT seq, time_ns, kind, job_id, body,"
                            " prev_hash, hash, mac, key_id FROM main.per WHERE seq >= ?"
                            " ORDER BY seq", (first,)).rowcount
        conn.execute("INSERT INTO cp.checkpoint(text) SELECT text FROM main.checkpoint"
                     " WHERE size > ? ORDER BY id", (first,))
        return Snapshot(size, value, None, rows, first)
    finally:
        conn.execute("COMMIT")


def _new_copy(workdir: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix="node-", suffix=".db", dir=workdir)  # mode 0600
    os.close(fd)
    return Path(name)


def discard(copy: Path | None) -> None:
    if copy is not None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)


class CopyReader:
    """The private copy, read a page at a time in seq order, with the lookups the
    verifier's slow path needs and the `leaf` table it fills."""

    def __init__(self, copy: Path) -> None:
        self.path = copy
        self.conn = sqlite3.connect(copy, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.lenient_pages = 0

    def pages(self, first: int, size: int = PAGE) -> Iterator[list[RawRecord]]:
        """Rows with seq >= first, in pages. Text columns are decoded strictly; a page
        that holds invalid UTF-8 is read again leniently (U+FFFD), as the verifier
        reads it, and counted in `lenient_pages`."""
        at = first
        sql = f"SELECT {_COLUMNS} FROM per WHERE seq >= ? ORDER BY seq LIMIT ?"  # noqa: S608
        while True:
            self.conn.text_factory = str
            try:
                rows = self.conn.execute(sql, (at, size)).fetchall()
            except sqlite3.OperationalError:
                self.conn.text_factory = _lenient
                rows = self.conn.execute(sql, (at, size)).fetchall()
                self.lenient_pages += 1
            if not rows:
                return
            yield list(map(RawRecord._make, rows))
            if len(rows) < size:
                return
            at = int(rows[-1][0]) + 1

    def checkpoints(self) -> list[str]:
        self.conn.text_factory = _lenient
        return [str(r[0]) for r in self.conn.execute("SELECT text FROM checkpoint ORDER BY id")]

    def hash_at(self, seq: int) -> bytes | None:
        row = self.conn.execute("SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?",
                                (seq,)).fetchone()
        return None if row is None else bytes(row[0])

    def seq_of_hash(self, value: bytes) -> int | None:
        """The newest seq whose stored hash is `value` (a scan: only damage asks)."""
        row = self.conn.execute("SELECT max(seq) FROM per WHERE CAST(hash AS BLOB) = ?",
                                (value,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def add_leaves(self, rows: list[tuple[int, bytes, int | None]]) -> None:
        self.conn.executemany("INSERT INTO leaf VALUES (?, ?, ?)", rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def _lenient(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def source_hashes(path: Path, first: int, last: int) -> Iterator[list[tuple[int, bytes]]]:
    """(seq, stored hash) of a source's rows first..last, a page at a time (only a fork
    search reads old rows)."""
    conn = connect(path, readonly=True)
    try:
        at = first
        while at <= last:
            rows = conn.execute("SELECT seq, CAST(hash AS BLOB) FROM per WHERE seq BETWEEN ? AND ?"
                                " ORDER BY seq LIMIT ?", (at, last, PAGE)).fetchall()
            if not rows:
                return
            yield [(int(s), bytes(h) if isinstance(h, bytes) else b"") for s, h in rows]
            at = int(rows[-1][0]) + 1
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: unreadable ledger: {exc}") from None
    finally:
        conn.close()


def node_size(arg: str) -> int:
    """How many records a source says its node holds (for a progress bar's length)."""
    _, path = split_arg(arg)
    try:
        conn, _meta = open_existing(path)
    except SparkError:
        return 0
    try:
        row = conn.execute("SELECT max(seq) FROM per").fetchone()
        return 0 if row is None or row[0] is None else int(row[0]) + 1
    except sqlite3.DatabaseError:
        return 0
    finally:
        conn.close()
