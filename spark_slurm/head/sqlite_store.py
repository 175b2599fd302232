"""The cluster store in one SQLite file: the embedded default.

Each node's records are copied byte for byte (seq, time, kind, job id, body bytes,
previous hash, hash, MAC, key id) under that node's id. Beside them: each node's
head, Merkle compact range and followed signing keys (so the next merge reads
only new rows), the checkpoints seen or witnessed, every finding, the losing
side of each fork, and the leaves that anchor a retention cut. Indexes are
chosen for `audit JOBID` on ten million rows: the job index finds a job's
records, the ref index finds follow-ups, and the stored leaves plus the stored
perfect subtrees let inclusion proofs be built from O(log n) hashes.

New rows arrive from the source (node ledger or segment), attached read-only as
`src`, by one `INSERT ... SELECT` that hands every row to merge's check on its way
in and stores only the rows the check returned a Merkle leaf for.
WAL mode: audits read while a merge writes.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, cast

from spark_slurm.errors import HeadDbError
from spark_slurm.head.scan import RawRecord
from spark_slurm.head.source import PAGE, read_only_uri
from spark_slurm.head.store import (
    MAGIC,
    SCHEMA_VERSION,
    Advance,
    Finding,
    NodeState,
    PruneNote,
    RowCheck,
    StoredCheckpoint,
    parse_prunes,
    prunes_text,
)
from spark_slurm.ledger.records import Record

BULK_WAL_PAGES = 16384  # 256 MiB of 16 KiB pages before a merge checkpoints early
CACHE_KIB = 65536  # page cache for index updates during a merge

SCHEMA = """
CREATE TABLE IF NOT EXISTS head_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    origin TEXT,
    head_seq INTEGER,
    head_hash TEXT,
    count INTEGER NOT NULL DEFAULT 0,
    frontier BLOB NOT NULL DEFAULT x'',
    signers TEXT NOT NULL DEFAULT '[]',
    first_seq INTEGER NOT NULL DEFAULT 0,
    anchor BLOB
);
CREATE TABLE IF NOT EXISTS records (
    node_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB,
    key_id TEXT,
    ref_seq INTEGER,
    leaf BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_node_seq ON records(node_id, seq);
CREATE INDEX IF NOT EXISTS records_job ON records(job_id) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_ref ON records(node_id, ref_seq) WHERE ref_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS subtrees (
    node_id INTEGER NOT NULL,
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (node_id, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cut_leaves (
    node_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    leaf BLOB NOT NULL,
    PRIMARY KEY (node_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    node_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    root TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    UNIQUE (node_id, size, root, source)
);
CREATE TABLE IF NOT EXISTS findings (
    id INTEGER PRIMARY KEY,
    code TEXT NOT NULL,
    node TEXT NOT NULL,
    seq INTEGER,
    detail TEXT NOT NULL,
    source TEXT NOT NULL,
    first_seen_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS findings_once ON findings(code, node, ifnull(seq, -1), detail);
CREATE TABLE IF NOT EXISTS forks (
    node_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB,
    key_id TEXT,
    source TEXT NOT NULL,
    UNIQUE (node_id, seq, hash)
);
"""

_CREATE = (f"BEGIN IMMEDIATE;{SCHEMA}INSERT INTO head_meta VALUES ('magic',"  # noqa: S608
           f" '{MAGIC}'), ('schema', '{SCHEMA_VERSION}');COMMIT;")
_NODE_COLS = ("node_id, name, origin, head_seq, head_hash, count, frontier, signers,"
              " first_seq, anchor")
_NODE = f"SELECT {_NODE_COLS} FROM nodes "  # noqa: S608 (fixed columns)
_SELECT = ("SELECT n.name, r.seq, r.time_ns, r.kind, r.job_id, r.body, r.prev_hash, r.hash,"
           " r.mac, r.key_id FROM records r JOIN nodes n ON n.node_id = r.node_id ")
_REF = ("CASE WHEN instr(CAST(body AS BLOB), X'22726566223a') > 0"  # '"ref":'
        " AND json_valid(CAST(body AS TEXT))"
        " AND typeof(json_extract(CAST(body AS TEXT), '$.body.ref.seq')) = 'integer'"
        " THEN json_extract(CAST(body AS TEXT), '$.body.ref.seq') END")
"""`scan.ref_seq_of` in SQL: body.ref.seq when it is an integer that fits (a JSON
true is 1, false 0; an integer too big for 64 bits comes back as a REAL)."""
_CHECKED = (
    "INSERT OR IGNORE INTO records(node_id, seq, time_ns, kind, job_id, body, prev_hash,"  # noqa: S608
    " hash, mac, key_id, ref_seq, leaf) SELECT ?1, seq, time_ns, kind, job_id,"
    " CAST(body AS BLOB), CAST(prev_hash AS BLOB), CAST(hash AS BLOB), CAST(mac AS BLOB),"
    f" key_id, {_REF}, spark_check"
    "(seq, time_ns, kind, job_id, CAST(body AS BLOB),"
    " CAST(prev_hash AS BLOB), CAST(hash AS BLOB), CAST(mac AS BLOB), key_id)"
    " FROM src.per WHERE seq >= ?2 ORDER BY seq")
"""Every source row from `first` on, through the check: a row whose leaf comes back
NULL (the first that fails, and every one after it) breaks the NOT NULL constraint
on `leaf` and OR IGNORE skips it, so exactly the checked prefix is stored."""
_CHECKED_TEXT = _CHECKED.replace(
    "spark_check(seq, time_ns, kind, job_id,",
    "spark_check_blobs(seq, CASE typeof(time_ns) WHEN 'integer' THEN time_ns ELSE"
    " CAST(time_ns AS BLOB) END, CAST(kind AS BLOB), typeof(kind), CAST(job_id AS BLOB),"
    " typeof(job_id),").replace("CAST(mac AS BLOB), key_id)",
                                "CAST(mac AS BLOB), CAST(key_id AS BLOB), typeof(key_id))")
"""The same for a source holding text that is not UTF-8 (sqlite3 cannot hand such a
column to Python as text): every text column goes as bytes and its type."""
_FORK = ("INSERT OR IGNORE INTO forks(node_id, seq, time_ns, kind, body, prev_hash, hash, mac,"
         " key_id, source) VALUES (?,?,?,?,?,?,?,?,?,?)")


def signers_text(keys: Iterable[bytes]) -> str:
    return json.dumps([base64.b64encode(k).decode() for k in keys])


def signers_of(text: str | None) -> tuple[bytes, ...]:
    try:
        return tuple(base64.b64decode(k) for k in json.loads(text or "[]"))
    except (ValueError, TypeError):
        return ()


def node_state(row: Sequence[Any]) -> NodeState:
    node_id, name, origin, head_seq, head_hash, count, frontier, signers, first, anchor = row
    return NodeState(node_id, name, origin, head_seq, head_hash, int(count),
                     bytes(frontier or b""), signers_of(signers), int(first or 0),
                     None if anchor is None else bytes(anchor))


def is_sqlite_store(path: Path) -> bool:
    """True when the file is a cluster store (has our meta table and magic)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        row = conn.execute("SELECT value FROM head_meta WHERE key='magic'").fetchone()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return row is not None and row[0] == MAGIC


def _records(conn: sqlite3.Connection, where: str, args: Iterable[Any]) -> Iterator[Record]:
    for node, seq, t, kind, job, body, prev, h, mac, key_id in conn.execute(
            _SELECT + where, tuple(args)):
        yield Record(seq, t, kind, job, bytes(body), bytes(prev).hex(), bytes(h).hex(),
                     None if mac is None else bytes(mac).hex(), key_id, node)


class SqliteReads:
    """The read half (audit, replay, proofs), shared by the store and its writer."""

    conn: sqlite3.Connection

    def node(self, name: str) -> NodeState | None:
        row = self.conn.execute(_NODE + "WHERE name=?", (name,)).fetchone()
        return node_state(row) if row else None

    def nodes(self) -> list[NodeState]:
        return [node_state(r) for r in self.conn.execute(_NODE + "ORDER BY name")]

    def stored_hashes(self, node_id: int, first: int, last: int) -> dict[int, bytes]:
        """seq -> raw hash for the stored records of a node in [first, last]."""
        rows = self.conn.execute(
            "SELECT seq, hash FROM records WHERE node_id=? AND seq BETWEEN ? AND ?",
            (node_id, first, last))
        return {int(s): bytes(h) for s, h in rows}

    def hash_at(self, node_id: int, seq: int) -> bytes | None:
        row = self.conn.execute("SELECT hash FROM records WHERE node_id=? AND seq=?",
                                (node_id, seq)).fetchone()
        if row is None:  # the last record a retention cut removed
            row = self.conn.execute("SELECT anchor FROM nodes WHERE node_id=? AND"
                                    " first_seq=? AND anchor IS NOT NULL",
                                    (node_id, seq + 1)).fetchone()
        return None if row is None else bytes(row[0])

    def record(self, node_id: int, seq: int) -> Record | None:
        recs = list(_records(self.conn, "WHERE r.node_id=? AND r.seq=?", (node_id, seq)))
        return recs[0] if recs else None

    def findings(self, node: str | None = None) -> list[Finding]:
        sql = "SELECT code, node, seq, detail FROM findings"
        args: tuple[Any, ...] = ()
        if node is not None:
            sql += " WHERE node=?"
            args = (node,)
        return [Finding(*r) for r in self.conn.execute(sql + " ORDER BY id", args)]

    def prunes(self) -> list[PruneNote]:
        row = self.conn.execute("SELECT value FROM head_meta WHERE key='prunes'").fetchone()
        return parse_prunes(row[0] if row else None)

    def latest_checkpoint(self, node_id: int, max_size: int) -> StoredCheckpoint | None:
        """The largest checkpoint of a node covering only merged records (witnessed
        ones win a tie)."""
        row = self.conn.execute(
            "SELECT n.name, c.size, c.root, c.text, c.source FROM checkpoints c"
            " JOIN nodes n USING (node_id) WHERE c.node_id=? AND c.size <= ?"
            " ORDER BY c.size DESC, c.source = 'witness' DESC LIMIT 1",
            (node_id, max_size)).fetchone()
        return StoredCheckpoint(*row) if row else None

    def checkpoints(self, node_id: int) -> list[StoredCheckpoint]:
        rows = self.conn.execute(
            "SELECT n.name, c.size, c.root, c.text, c.source FROM checkpoints c"
            " JOIN nodes n USING (node_id) WHERE c.node_id=? ORDER BY c.size", (node_id,))
        return [StoredCheckpoint(*r) for r in rows]

    def largest_checkpoint(self, node_id: int, source: str) -> StoredCheckpoint | None:
        row = self.conn.execute(
            "SELECT n.name, c.size, c.root, c.text, c.source FROM checkpoints c"
            " JOIN nodes n USING (node_id) WHERE c.node_id=? AND c.source=?"
            " ORDER BY c.size DESC LIMIT 1", (node_id, source)).fetchone()
        return StoredCheckpoint(*row) if row else None

    def checkpoints_at(self, node_id: int, size: int) -> list[StoredCheckpoint]:
        rows = self.conn.execute(
            "SELECT n.name, c.size, c.root, c.text, c.source FROM checkpoints c"
            " JOIN nodes n USING (node_id) WHERE c.node_id=? AND c.size=?", (node_id, size))
        return [StoredCheckpoint(*r) for r in rows]

    def leaves(self, node_id: int, first_seq: int, count: int) -> list[bytes]:
        rows = self.conn.execute(
            "SELECT seq, leaf FROM records WHERE node_id=?1 AND seq >= ?2 AND seq < ?3"
            " UNION ALL SELECT seq, leaf FROM cut_leaves WHERE node_id=?1 AND seq >= ?2"
            " AND seq < ?3 ORDER BY seq", (node_id, first_seq, first_seq + count))
        return [bytes(r[1]) for r in rows]

    def subtree(self, node_id: int, level: int, index: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT hash FROM subtrees WHERE node_id=? AND level=? AND idx=?",
            (node_id, level, index)).fetchone()
        return None if row is None else bytes(row[0])

    def job_records(self, job_id: str) -> list[Record]:
        return list(_records(self.conn, "WHERE r.job_id=?", (job_id,)))

    def node_records(self, node: str, first_seq: int, last_seq: int,
                     kinds: Sequence[str]) -> list[Record]:
        marks = ",".join("?" * len(kinds))
        return list(_records(
            self.conn,
            f"WHERE n.name=? AND r.seq BETWEEN ? AND ? AND r.kind IN ({marks}) ORDER BY r.seq",
            (node, first_seq, last_seq, *kinds)))

    def followups(self, node: str, seq: int) -> list[Record]:
        return list(_records(
            self.conn,
            "WHERE r.node_id=(SELECT node_id FROM nodes WHERE name=?) AND r.ref_seq=?",
            (node, seq)))

    def record_before(self, node: str, seq: int, kind: str) -> Record | None:
        recs = list(_records(
            self.conn,
            "WHERE r.node_id=(SELECT node_id FROM nodes WHERE name=?) AND r.seq < ?"
            " AND r.kind=? ORDER BY r.seq DESC LIMIT 1", (node, seq, kind)))
        return recs[0] if recs else None

    def records_until(self, node: str | None, time_ns: int,
                      kinds: Sequence[str]) -> Iterator[Record]:
        marks = ",".join("?" * len(kinds))
        where = f"WHERE r.time_ns <= ? AND r.kind IN ({marks})"
        args: list[Any] = [time_ns, *kinds]
        if node is not None:
            where += " AND n.name=?"
            args.append(node)
        return _records(self.conn, where + " ORDER BY r.node_id, r.seq", args)

    def records_of_kind(self, kinds: Sequence[str], node: str | None = None
                        ) -> Iterator[Record]:
        marks = ",".join("?" * len(kinds))
        where = f"WHERE r.kind IN ({marks})"
        args: list[Any] = list(kinds)
        if node is not None:
            where += " AND n.name=?"
            args.append(node)
        return _records(self.conn, where + " ORDER BY r.node_id, r.seq", args)


class SqliteWriter(SqliteReads):
    """One merge transaction (BEGIN IMMEDIATE: concurrent merges serialise), the
    source attached as `src`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def lock_node(self, name: str, origin: str | None) -> NodeState:
        state = self.node(name)  # BEGIN IMMEDIATE already holds the write lock
        if state is None or (state.origin is None and origin is not None):
            self.conn.execute("INSERT INTO nodes(name, origin) VALUES (?, ?) ON CONFLICT (name)"
                              " DO UPDATE SET origin = coalesce(origin, excluded.origin)",
                              (name, origin))
            state = self.node(name)
        assert state is not None
        return state

    def append(self, state: NodeState, first: int, check: RowCheck) -> int:
        def checked(*cols: Any) -> bytes | None:
            return check(cols)

        self.conn.create_function("spark_check", 9, checked)
        try:
            return int(self.conn.execute(_CHECKED, (state.node_id, first)).rowcount)
        except sqlite3.OperationalError:
            # a text column sqlite3 cannot decode: SQLite undid the statement and the
            # check has seen the rows before it; start again, text as bytes
            check.restart()
            self.conn.create_function("spark_check_blobs", 12, _as_text(check))
            return int(self.conn.execute(_CHECKED_TEXT, (state.node_id, first)).rowcount)

    def mark(self) -> None:
        self.conn.execute("SAVEPOINT merged_rows")

    def undo(self) -> None:
        self.conn.execute("ROLLBACK TO merged_rows")

    def set_head(self, state: NodeState, step: Advance) -> None:
        self.conn.execute(
            "UPDATE nodes SET head_seq=?, head_hash=?, count=count+?, frontier=?, signers=?"
            " WHERE node_id=?",
            (step.last, step.head_hash.hex(), step.last - step.first + 1, step.frontier,
             signers_text(step.signers), state.node_id))
        self.conn.executemany("INSERT OR REPLACE INTO subtrees VALUES (?,?,?,?)",
                              [(state.node_id, lv, i, h) for lv, i, h in step.subtrees])

    def keep_forks(self, node_id: int, rows: Sequence[Any], source: str) -> None:
        self.conn.executemany(_FORK, [(node_id, r[0], r[1], r[2], r[4], r[5], r[6], r[7], r[8],
                                       source) for r in rows])

    def add_checkpoint(self, node_id: int, size: int, root: str, text: str,
                       source: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO checkpoints(node_id, size, root, text, source)"
            " VALUES (?,?,?,?,?)", (node_id, size, root, text, source))

    def add_finding(self, finding: Finding, source: str, now_ns: int) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO findings(code, node, seq, detail, source, first_seen_ns)"
            " VALUES (?,?,?,?,?,?)",
            (finding.code, finding.node, finding.seq, finding.detail, source, now_ns))
        return cur.rowcount > 0


def _as_text(check: RowCheck) -> Callable[..., bytes | None]:
    """`spark_check_blobs`: a row whose text columns came as bytes (and their types)
    rebuilt as the verifier reads it; text that is not UTF-8 fails the row."""
    def checked(*cols: Any) -> bytes | None:
        seq, time_ns, kind, kind_t, job, job_t, body, prev, value, mac, key_id, key_t = cols
        try:
            text = [_text(kind, kind_t), _text(job, job_t), _text(key_id, key_t)]
        except UnicodeDecodeError:
            check.stop("TAMPERED", seq, "a text column is not valid UTF-8")
            return None
        return check(RawRecord(seq, time_ns, text[0], text[1], body, prev, value, mac, text[2]))

    return checked


def _text(value: bytes | None, kind: str) -> Any:
    if kind == "text" and value is not None:
        return value.decode("utf-8")
    return None if kind == "null" else value


class SqliteStore(SqliteReads):
    """The cluster store in one SQLite file. One merge writes at a time; readers see
    committed state."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.url = str(path)

    @property
    def name(self) -> str:
        return str(self.path)

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> SqliteStore:
        """Open (or, with create, initialise) a cluster store; refuses other files."""
        if not create and not path.exists():
            raise HeadDbError(f"{path}: no such cluster ledger")
        try:
            # URI filenames: the source is attached read-only (`file:...?mode=ro`)
            conn = sqlite3.connect(path.resolve().as_uri(), uri=True, timeout=30.0,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # sources are attached to this connection: their schema is not trusted to
            # call functions (merge's check among them) from views or triggers
            conn.execute("PRAGMA trusted_schema=OFF")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            raise HeadDbError(f"{path}: cannot open as SQLite ({exc})") from None
        if "head_meta" not in tables:
            if tables:  # never add our tables to someone else's database
                conn.close()
                kind = " (it is a node ledger)" if "per" in tables else ""
                raise HeadDbError(f"{path}: not a merged cluster ledger{kind}")
            if not create:
                conn.close()
                raise HeadDbError(f"{path}: not a merged cluster ledger")
            conn.execute("PRAGMA journal_mode=DELETE")  # page size is fixed once in WAL
            conn.execute("PRAGMA page_size=16384")  # ~600-byte rows: fewer page splits
            conn.execute("VACUUM")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_CREATE)  # one transaction: a half-made store is never left
        version = conn.execute("SELECT value FROM head_meta WHERE key='schema'").fetchone()
        if version is not None and version[0] == "1":
            from spark_slurm.head.upgrade import upgrade_sqlite  # noqa: PLC0415 (once)

            upgrade_sqlite(conn, path)
            version = (str(SCHEMA_VERSION),)
        if version is None or version[0] != str(SCHEMA_VERSION):
            conn.close()
            raise HeadDbError(f"{path}: unknown merged ledger schema version {version}")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def writer(self, source: Path | None, *, node: str | None = None, after: int = -1
               ) -> Iterator[SqliteWriter]:
        """BEGIN IMMEDIATE (after attaching `source` read-only as `src`, which SQLite
        allows only outside a transaction), COMMIT on success."""
        if source is not None:
            self.conn.execute("ATTACH DATABASE ? AS src", (read_only_uri(source),))
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteWriter(self.conn)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        finally:
            if source is not None:
                self.conn.execute("DETACH DATABASE src")

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """Checkpoint the WAL once after a merge instead of after every node's commit.

        Each commit stays durable in the WAL; copying pages back into the database is
        what is deferred, so index pages touched by every node are written back once."""
        old = self.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        self.conn.execute(f"PRAGMA wal_autocheckpoint={BULK_WAL_PAGES}")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA wal_autocheckpoint={int(old)}")
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def maintenance(self) -> AbstractContextManager[SqliteMaintenance]:
        """Retention's transaction: merges wait until it ends."""
        return cast("AbstractContextManager[SqliteMaintenance]", maintenance(self))

    def import_checkpoint(self, node: str, origin: str, size: int, root: str, text: str, *,
                          source: str) -> None:
        with self.writer(None) as w:
            state = w.lock_node(node, origin)
            w.add_checkpoint(state.node_id, size, root, text, source)


class SqliteMaintenance(SqliteReads):
    """Retention inside one BEGIN IMMEDIATE transaction (merges wait for it)."""

    def __init__(self, conn: sqlite3.Connection, name: str = "") -> None:
        self.conn = conn
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def close(self) -> None:
        """The store owns the connection."""

    def rows(self, node_id: int, first: int, last: int) -> Iterator[list[tuple[Any, ...]]]:
        """Stored rows first..last (all columns but node_id), a page at a time."""
        at = first
        while at <= last:
            page = self.conn.execute(
                "SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id, ref_seq,"
                " leaf FROM records WHERE node_id=? AND seq BETWEEN ? AND ? ORDER BY seq"
                " LIMIT ?", (node_id, at, last, PAGE)).fetchall()
            if not page:
                return
            yield [tuple(r) for r in page]
            at = int(page[-1][0]) + 1

    def cut_points(self, before_ns: int) -> tuple[dict[int, int], list[str]]:
        """Per node, the first record kept (the first at or after `before_ns`, never past
        the head), and no partitions (one file: rows are deleted)."""
        cuts = {}
        for state in self.nodes():
            if state.head_seq is None:
                continue
            row = self.conn.execute("SELECT min(seq) FROM records WHERE node_id=? AND seq > 0"
                                    " AND time_ns >= ?", (state.node_id, before_ns)).fetchone()
            first = state.head_seq if row is None or row[0] is None else int(row[0])
            cuts[state.node_id] = min(first, state.head_seq)
        return cuts, []

    def set_cut(self, state: NodeState, first: int, anchor: bytes | None,
                leaves: Sequence[tuple[int, bytes]]) -> int:
        """Keep records from `first` on (and the genesis), the leaves that anchor proofs
        across the cut, and the hash of the record before it; returns rows removed."""
        self.conn.execute("DELETE FROM cut_leaves WHERE node_id=?", (state.node_id,))
        self.conn.executemany("INSERT INTO cut_leaves VALUES (?,?,?)",
                              [(state.node_id, s, leaf) for s, leaf in leaves])
        removed = self.conn.execute("DELETE FROM records WHERE node_id=? AND seq > 0 AND"
                                    " seq < ?", (state.node_id, first)).rowcount
        self.conn.execute("UPDATE nodes SET first_seq=?, anchor=?, count=count-? WHERE"
                          " node_id=?", (first, anchor, removed, state.node_id))
        return int(removed)

    def drop(self, partitions: Sequence[str]) -> None:
        """Nothing to drop in one file (freed pages are reused; VACUUM shrinks it)."""

    def note_prune(self, note: PruneNote) -> None:
        self.conn.execute("INSERT INTO head_meta VALUES ('prunes', ?) ON CONFLICT (key) DO"
                          " UPDATE SET value = excluded.value",
                          (prunes_text([*self.prunes(), note]),))


def maintenance(store: SqliteStore) -> Any:
    """`SqliteStore.maintenance`: a context manager holding the write lock."""
    @contextmanager
    def held() -> Iterator[SqliteMaintenance]:
        store.conn.execute("BEGIN IMMEDIATE")
        try:
            yield SqliteMaintenance(store.conn, store.name)
        except BaseException:
            store.conn.execute("ROLLBACK")
            raise
        store.conn.execute("COMMIT")
    return held()
