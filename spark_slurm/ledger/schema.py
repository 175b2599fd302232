"""The ledger's SQLite tables, and opening a file as a ledger (or saying why not).

One place knows the table layout so the writer, the verifier, `show` and
`snapshot` agree; `docs/ledger-format.md` describes the same layout for people.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spark_slurm.errors import LedgerError
from spark_slurm.ledger.records import Record

FORMAT = "spark-slurm-ledger"
SCHEMA_VERSION = 2
"""What this code writes; it reads (verifies, and the writer upgrades) every version
in SCHEMA_VERSIONS."""
SCHEMA_VERSIONS = (1, 2)
SQLITE_MAGIC = b"SQLite format 3\x00"

DDL_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE per (
    seq INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB,
    key_id TEXT
);
CREATE INDEX per_job ON per (job_id) WHERE job_id IS NOT NULL;
CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE checkpoint (
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    text TEXT NOT NULL
);
"""

UPGRADE_V2 = """
CREATE INDEX per_rare ON per (kind)
    WHERE kind = 'genesis' OR kind = 'key' OR kind = 'policy' OR kind = 'reconcile';
CREATE TABLE tree (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
"""
"""What version 2 adds to version 1: an index of the rare kinds start-up looks up
(the policy in force, the signing key, the last start-up) and the stored Merkle
subtrees that make an inclusion proof cost O(log n).
Version 2 also keeps `state` rows `latest.journal` and `latest.spool` (see
INGEST_SOURCES)."""

RARE_KINDS = ("genesis", "key", "policy", "reconcile")
"""The kinds `per_rare` indexes (as its WHERE lists them): a few per day at most,
so the index costs appends and integrity checks next to nothing. (Written as ORs:
SQLite evaluates an IN list in a partial index's WHERE several times slower, on
every append and for every row of an integrity check.)"""

INGEST_SOURCES = ("journal", "spool")
"""Body `source` values whose newest record the writer notes in `state` as
`latest.<source>` = its seq (ASCII decimal), in the same transaction: sparkd's
ingest cursors come from that record, so start-up never searches for it."""
INGEST_MARKS = tuple((src, b'"source":"' + src.encode() + b'"') for src in INGEST_SOURCES)
"""Each ingest source and the bytes its records' canonical body holds."""

DDL = DDL_V1 + UPGRADE_V2
DDLS = {1: DDL_V1, 2: DDL}

PER_COLUMNS = "seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id"
INSERT_PER = ("INSERT INTO per (seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_TREE = "INSERT INTO tree (level, idx, hash) VALUES (?, ?, ?)"


def statements(ddl: str) -> list[str]:
    """The SQL statements of a DDL text."""
    return [s for s in ddl.split(";") if s.strip()]


def schema_version(meta: dict[str, str]) -> int:
    """The file's schema version (read_meta has checked it is one we read)."""
    return int(meta["schema_version"])


def row_to_record(row: Sequence[Any]) -> Record:
    """A `per` row (columns in PER_COLUMNS order) as a Record with hex hashes."""
    seq, time_ns, kind, job_id, body, prev, h, mac, key_id = row
    return Record(int(seq), int(time_ns), str(kind), job_id, bytes(body), bytes(prev).hex(),
                  bytes(h).hex(), None if mac is None else bytes(mac).hex(), key_id)


def expected_schema(version: int = SCHEMA_VERSION) -> list[tuple[str, str, str, str | None]]:
    """sqlite_master rows a ledger of that version must have: a damaged or edited
    table definition changes what readers see, so the verifier compares them exactly."""
    conn = sqlite3.connect(":memory:")
    for statement in statements(DDLS[version]):
        conn.execute(statement)
    rows = conn.execute(SCHEMA_ROWS).fetchall()
    conn.close()
    return [(str(a), str(b), str(c), None if d is None else str(d)) for a, b, c, d in rows]


SCHEMA_ROWS = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit)."""
    try:
        if readonly:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False)
            # A damaged file may hold invalid UTF-8: read it as U+FFFD so the
            # checks fail cleanly (the hashed bytes then no longer match).
            conn.text_factory = _lenient_text
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
    except (sqlite3.Error, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot open as SQLite: {exc}") from None
    return conn


def check_file(path: Path, *, allow_empty: bool) -> bool:
    """True when the file exists with content; refuses non-SQLite files."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read: {exc.strerror}") from None
    if path.is_dir():
        raise LedgerError(f"{path}: is a directory, not a ledger")
    if size == 0:
        if allow_empty:
            return False
        raise LedgerError(f"{path}: empty file, not a ledger")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read: {exc.strerror}") from None
    if head != SQLITE_MAGIC:
        raise LedgerError(f"{path}: not a ledger (not an SQLite database)")
    return True


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    """The meta table, after checking this is a ledger of a version we understand."""
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except UnicodeDecodeError:
        raise LedgerError(f"{path}: unreadable SQLite database (damaged schema)") from None
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc):
            raise LedgerError(f"{path}: not a ledger (SQLite database without a meta table)")\
                from None
        raise LedgerError(f"{path}: unreadable SQLite database: {exc}") from None
    meta = {str(k): str(v) for k, v in rows}
    if meta.get("format") != FORMAT:
        raise LedgerError(f"{path}: not a ledger (format is {meta.get('format')!r})")
    version = meta.get("schema_version", "")
    if version not in {str(v) for v in SCHEMA_VERSIONS}:
        known = " and ".join(str(v) for v in SCHEMA_VERSIONS)
        raise LedgerError(
            f"{path}: unknown ledger schema version {version!r} (this tool reads {known})"
        )
    return meta


def open_existing(path: str | os.PathLike[str]) -> tuple[sqlite3.Connection, dict[str, str]]:
    """Open a ledger read-only for verification, display or backup."""
    p = Path(path)
    if not check_file(p, allow_empty=False):
        raise LedgerError(f"{p}: no such ledger file")
    conn = connect(p, readonly=True)
    try:
        meta = read_meta(conn, p)
    except LedgerError:
        conn.close()
        raise
    return conn, meta
