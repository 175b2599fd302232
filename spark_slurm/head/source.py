"""What merge reads from a node: a whole ledger snapshot or an exported segment.

Merge reads only the records past what the head node already holds. The rows
themselves are read once, by the cluster store's own `INSERT ... SELECT` (or, for
PostgreSQL, one pass feeding `COPY`), with every row checked on its way in: what
is checked is what is stored, so a source edited or swapped while a merge runs
cannot slip unchecked rows in, and no private copy of the source is needed.
Everything else merge wants of a source — who it is, its size, the hash at the
stored head, the checkpoints covering new rows, and on the rare slow paths a
lookup or a fork search — comes from `SourceReader`, one read-only snapshot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from spark_slurm.errors import LedgerError, SparkError
from spark_slurm.head.scan import RawRecord
from spark_slurm.ledger.cut import cut_of
from spark_slurm.ledger.schema import check_file, open_existing, read_meta
from spark_slurm.ledger.segment import SEGMENT_FORMAT, segment_meta

PAGE = 4096  # rows per page where rows are read in Python: bounded memory

COLUMNS = ("seq, time_ns, kind, job_id, CAST(body AS BLOB), CAST(prev_hash AS BLOB),"
           " CAST(hash AS BLOB), CAST(mac AS BLOB), key_id")


@dataclass(frozen=True, slots=True)
class Source:
    """One merge argument, opened: what kind of file, whose, and where it starts."""

    arg: str
    path: Path
    expected: str | None
    kind: str  # "ledger" or "segment"
    meta: dict[str, str]
    genesis: RawRecord | None
    after: int  # a segment, or a pruned ledger, holds the rows after this seq (-1: all)

    @property
    def name(self) -> str:
        return str(self.path)


def read_only_uri(path: Path) -> str:
    """The SQLite URI merge reads a source with: read-only, and `immutable` (no locks,
    no shared memory: several times cheaper to open) unless a writer still has frames
    in its WAL, whose rows must be seen. Sources are snapshots or segments; should one
    change anyway, rows are still checked on their way into the store."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    wal = Path(f"{path}-wal")
    try:
        live = wal.stat().st_size > 0
    except OSError:
        live = False
    return uri if live else uri + "&immutable=1"


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to a source, text read as the verifier reads it."""
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot open as SQLite: {exc}") from None
    conn.text_factory = _lenient
    return conn


def _lenient(data: bytes) -> str:
    return data.decode("utf-8", "replace")


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
    conn = open_read_only(path)
    try:
        return _identify(conn, arg, expected, path)
    finally:
        conn.close()


def _identify(conn: sqlite3.Connection, arg: str, expected: str | None, path: Path) -> Source:
    raw_meta = _meta_rows(conn, path)
    kinds = dict(conn.execute("SELECT name, type FROM sqlite_master WHERE name IN"
                              " ('per', 'checkpoint')").fetchall())
    if kinds != {"per": "table", "checkpoint": "table"}:  # a view could run anything
        raise LedgerError(f"{path}: not a ledger (per and checkpoint must be tables)")
    if raw_meta.get("format") == SEGMENT_FORMAT:
        meta, after = segment_meta(raw_meta, path)
        kind = "segment"
    else:
        meta, after, kind = read_meta(conn, path), -1, "ledger"
        cut = cut_of(meta, str(path))
        if cut is not None:  # a pruned node ledger holds (but a few) the rows from its cut
            after = cut.seq - 1
    row = _fetch_one(conn, f"SELECT {COLUMNS} FROM per WHERE seq = 0",  # noqa: S608
                     (), path)
    if row is None and kind == "segment" and _fetch_one(
            conn, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'genesis'",
            (), path) is not None:
        # a segment past genesis carries the node's genesis row on the side: who the
        # node is now (its keys) is read from the node, as from a whole ledger
        row = _fetch_one(conn, f"SELECT {COLUMNS} FROM genesis WHERE seq = 0",  # noqa: S608
                         (), path)
    genesis = None if row is None else RawRecord._make(row)
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


class SourceReader:
    """A source, read-only, in one read snapshot: its size and what merge looks up."""

    def __init__(self, source: Source, conn: sqlite3.Connection | None = None) -> None:
        self.source = source
        self.path = source.path
        self.conn = conn if conn is not None else open_read_only(source.path)
        try:
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN")
            last = _fetch_one(self.conn, "SELECT max(seq) FROM per", (), self.path)
        except BaseException:
            self.conn.close()
            raise
        size = 0 if last is None or last[0] is None else int(str(last[0])) + 1
        if source.kind == "segment":  # an empty segment still says how big the node was
            size = max(size, int(source.meta.get("size", "0")))
        self.size = size
        """Records the node ledger holds (its newest seq + 1), in this snapshot."""

    @classmethod
    def open(cls, arg: str) -> SourceReader:
        """`open_source` and the snapshot on one connection."""
        expected, path = split_arg(arg)
        if not check_file(path, allow_empty=False):
            raise LedgerError(f"{path}: no such ledger file")
        conn = open_read_only(path)
        try:
            conn.execute("BEGIN")
            source = _identify(conn, arg, expected, path)
        except BaseException:
            conn.close()
            raise
        return cls(source, conn)

    def close(self) -> None:
        self.conn.close()

    def hash_at(self, seq: int) -> bytes | None:
        row = _fetch_one(self.conn, "SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?", (seq,),
                         self.path)
        return None if row is None or not isinstance(row[0], bytes) else row[0]

    def seq_of_hash(self, value: bytes) -> int | None:
        """The newest seq whose stored hash is `value` (a scan: only damage asks)."""
        row = _fetch_one(self.conn, "SELECT max(seq) FROM per WHERE CAST(hash AS BLOB) = ?",
                         (value,), self.path)
        return None if row is None or row[0] is None else int(str(row[0]))

    def first_seq(self) -> int | None:
        row = _fetch_one(self.conn, "SELECT min(seq) FROM per", (), self.path)
        return None if row is None or row[0] is None else int(str(row[0]))

    def pages(self, first: int, last: int | None = None) -> Iterator[list[RawRecord]]:
        """Rows with first <= seq (<= last), in pages, text decoded as the verifier reads
        it (U+FFFD for invalid UTF-8)."""
        at, end = first, (2**63 - 1 if last is None else last)
        sql = f"SELECT {COLUMNS} FROM per WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?"  # noqa: S608
        while at <= end:
            try:
                rows = self.conn.execute(sql, (at, end, PAGE)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"{self.path}: unreadable ledger: {exc}") from None
            if not rows:
                return
            yield list(map(RawRecord._make, rows))
            at = int(rows[-1][0]) + 1

    def hashes(self, first: int, last: int) -> Iterator[list[tuple[int, bytes]]]:
        """(seq, stored hash) of rows first..last, a page at a time (a fork search)."""
        at = first
        while at <= last:
            rows = self.conn.execute("SELECT seq, CAST(hash AS BLOB) FROM per WHERE seq"
                                     " BETWEEN ? AND ? ORDER BY seq LIMIT ?",
                                     (at, last, PAGE)).fetchall()
            if not rows:
                return
            yield [(int(s), h if isinstance(h, bytes) else b"") for s, h in rows]
            at = int(rows[-1][0]) + 1

    def checkpoints(self, after: int) -> list[str]:
        """The checkpoint notes covering any record with seq >= after: those written
        since the newest that does not (ids follow sizes), so the cost follows the new
        checkpoints, not the node's history of them."""
        try:
            return [str(r[0]) for r in self.conn.execute(
                "SELECT text FROM checkpoint WHERE id > coalesce((SELECT id FROM checkpoint"
                " WHERE size <= ?1 ORDER BY id DESC LIMIT 1), -1) AND size > ?1 ORDER BY id",
                (after,))]
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: unreadable ledger: {exc}") from None


def node_size(arg: str) -> int:
    """How many records a source says its node holds."""
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
