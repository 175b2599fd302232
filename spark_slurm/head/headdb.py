"""The merged cluster ledger on the head node: schema, writes and the audit queries.

Each node's records are copied byte for byte (seq, time, kind, job id, body bytes,
previous hash, hash, MAC, key id) under that node's id, so every node chain can
still be verified on its own. Beside them: the checkpoints the head node has
seen or witnessed, every finding a merge made, and the losing side of each fork
kept as evidence. Indexes are chosen for `audit JOBID` on ten million rows: the
job index finds a job's records, the ref index finds facility follow-ups, and
the Merkle leaf column lets inclusion proofs be built without reading bodies.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.canonical import parse_body
from spark_slurm.errors import HeadDbError

SCHEMA_VERSION = 1
BULK_WAL_PAGES = 16384  # 256 MiB of 16 KiB pages before a merge checkpoints early
MAGIC = "spark-head"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS head_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    origin TEXT,
    head_seq INTEGER,
    head_hash TEXT,
    count INTEGER NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS merkle_blocks (
    node_id INTEGER NOT NULL,
    block INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (node_id, block)
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
    first_seen_ns INTEGER NOT NULL,
    UNIQUE (code, node, seq, detail)
);
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


_SELECT = ("SELECT n.name, r.seq, r.time_ns, r.kind, r.job_id, r.body, r.prev_hash, r.hash,"
           " r.mac, r.key_id FROM records r JOIN nodes n ON n.node_id = r.node_id ")


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One PER as kept on the head node (or read from a node ledger), with its node."""

    node: str
    seq: int
    time_ns: int
    kind: str
    job_id: str | None
    body_bytes: bytes
    prev_hash: str
    hash: str
    mac: str | None
    key_id: str | None

    @property
    def body(self) -> dict[str, Any]:
        """The PER body inside the stored envelope (empty when unreadable)."""
        try:
            body = parse_body(self.body_bytes).get("body")
        except (ValueError, UnicodeDecodeError):
            return {}
        return body if isinstance(body, dict) else {}


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the head node holds of one node's chain."""

    node_id: int
    name: str
    origin: str | None
    head_seq: int | None
    head_hash: str | None
    count: int


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    node: str
    size: int
    root: str
    text: str
    source: str


@dataclass(frozen=True, slots=True)
class Finding:
    """A fixed-code observation a merge made about one node (and seq, when known)."""

    code: str
    node: str
    seq: int | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "node": self.node, "seq": self.seq, "detail": self.detail}


def is_head_db(path: Path) -> bool:
    """True when the file is a merged cluster ledger (has our meta table and magic)."""
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


class HeadDb:
    """The merged ledger. One writer (merge) at a time; readers see committed state."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> HeadDb:
        """Open (or, with create, initialise) a merged ledger; refuses other files."""
        if not create and not path.exists():
            raise HeadDbError(f"{path}: no such merged ledger")
        try:
            conn = sqlite3.connect(str(path), timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
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
            with conn:
                conn.executescript(_SCHEMA)
                conn.executemany("INSERT INTO head_meta VALUES (?, ?)",
                                 [("magic", MAGIC), ("schema", str(SCHEMA_VERSION))])
        version = conn.execute("SELECT value FROM head_meta WHERE key='schema'").fetchone()
        if version is None or version[0] != str(SCHEMA_VERSION):
            conn.close()
            raise HeadDbError(f"{path}: unknown merged ledger schema version {version}")
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def bulk_writes(self) -> Iterator[None]:
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

    def __enter__(self) -> HeadDb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- nodes -------------------------------------------------------------
    def node(self, name: str) -> NodeState | None:
        row = self.conn.execute(
            "SELECT node_id, name, origin, head_seq, head_hash, count FROM nodes WHERE name=?",
            (name,)).fetchone()
        return NodeState(*row) if row else None

    def nodes(self) -> list[NodeState]:
        rows = self.conn.execute(
            "SELECT node_id, name, origin, head_seq, head_hash, count FROM nodes ORDER BY name")
        return [NodeState(*r) for r in rows]

    def ensure_node(self, name: str, origin: str | None) -> NodeState:
        self.conn.execute("INSERT OR IGNORE INTO nodes(name, origin) VALUES (?, ?)", (name, origin))
        state = self.node(name)
        assert state is not None
        return state

    def stored_hashes(self, node_id: int, first: int, last: int) -> dict[int, bytes]:
        """seq -> raw hash for the stored records of a node in [first, last]."""
        rows = self.conn.execute(
            "SELECT seq, hash FROM records WHERE node_id=? AND seq BETWEEN ? AND ?",
            (node_id, first, last))
        return dict(rows)

    # -- writes (callers wrap these in one transaction per node) ------------
    def append(self, node_id: int, rows: Sequence[tuple[Any, ...]], head_seq: int,
               head_hash: str) -> None:
        """Append verified records, and move the node's head.

        Rows are (seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id,
        ref_seq, leaf) with hashes and MAC as the raw bytes the node ledger stores."""
        self.append_rows([(node_id, *r) for r in rows], head_seq, head_hash)

    def append_rows(self, rows: Sequence[tuple[Any, ...]], head_seq: int,
                    head_hash: str) -> None:
        """`append` with each row already led by its node id (all the same node).

        A MAC or ref_seq of '' is stored as NULL (neither column ever holds text): merge
        passes '' because sqlite3 binds str without the adapter lookup None costs."""
        if not rows:
            return
        self.conn.executemany(
            "INSERT INTO records(node_id, seq, time_ns, kind, job_id, body, prev_hash, hash,"
            " mac, key_id, ref_seq, leaf) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,NULLIF(?9,''),?10,"
            "NULLIF(?11,''),?12)", rows)
        self.conn.execute(
            "UPDATE nodes SET head_seq=?, head_hash=?, count=count+? WHERE node_id=?",
            (head_seq, head_hash, len(rows), rows[0][0]))

    def add_finding(self, finding: Finding, source: str, now_ns: int) -> bool:
        """Record a finding once; True when it was new."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO findings(code, node, seq, detail, source, first_seen_ns)"
            " VALUES (?,?,?,?,?,?)",
            (finding.code, finding.node, finding.seq, finding.detail, source, now_ns))
        return cur.rowcount > 0

    def add_fork(self, node_id: int, rec: StoredRecord, source: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO forks(node_id, seq, time_ns, kind, body, prev_hash, hash, mac,"
            " key_id, source) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (node_id, rec.seq, rec.time_ns, rec.kind, rec.body_bytes, bytes.fromhex(rec.prev_hash),
             bytes.fromhex(rec.hash), None if rec.mac is None else bytes.fromhex(rec.mac),
             rec.key_id, source))

    def add_checkpoint(self, node_id: int, size: int, root: str, text: str, source: str) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO checkpoints(node_id, size, root, text, source)"
            " VALUES (?,?,?,?,?)", (node_id, size, root, text, source))

    # -- reads ---------------------------------------------------------------
    def findings(self, node: str | None = None) -> list[Finding]:
        sql = "SELECT code, node, seq, detail FROM findings"
        args: tuple[Any, ...] = ()
        if node is not None:
            sql += " WHERE node=?"
            args = (node,)
        return [Finding(*r) for r in self.conn.execute(sql + " ORDER BY id", args)]

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

    def leaves(self, node_id: int, first_seq: int, count: int) -> list[bytes]:
        """Merkle leaf hashes of `count` records of a node from `first_seq` on."""
        rows = self.conn.execute(
            "SELECT leaf FROM records WHERE node_id=? AND seq >= ? AND seq < ? ORDER BY seq",
            (node_id, first_seq, first_seq + count))
        return [r[0] for r in rows]

    def first_seq(self, node_id: int) -> int | None:
        row = self.conn.execute("SELECT min(seq) FROM records WHERE node_id=?",
                                (node_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _records(self, sql: str, args: Iterable[Any]) -> Iterator[StoredRecord]:
        full = _SELECT + sql
        for node, seq, t, kind, job, body, prev, h, mac, key_id in self.conn.execute(
                full, tuple(args)):
            yield StoredRecord(node, seq, t, kind, job, body, prev.hex(), h.hex(),
                               None if mac is None else mac.hex(), key_id)

    def job_records(self, job_id: str) -> list[StoredRecord]:
        return list(self._records("WHERE r.job_id=?", (job_id,)))

    def node_records(self, node: str, first_seq: int, last_seq: int,
                     kinds: Sequence[str]) -> list[StoredRecord]:
        """A node's records of some kinds in a seq range (events around a job)."""
        marks = ",".join("?" * len(kinds))
        return list(self._records(
            f"WHERE n.name=? AND r.seq BETWEEN ? AND ? AND r.kind IN ({marks}) ORDER BY r.seq",
            (node, first_seq, last_seq, *kinds)))

    def followups(self, node: str, seq: int) -> list[StoredRecord]:
        """Records on a node whose `ref` points at the given seq (facility, release...)."""
        return list(self._records(
            "WHERE r.node_id=(SELECT node_id FROM nodes WHERE name=?) AND r.ref_seq=?",
            (node, seq)))

    def record_before(self, node: str, seq: int, kind: str) -> StoredRecord | None:
        """The latest record of a kind strictly before seq on a node (e.g. the policy)."""
        recs = list(self._records(
            "WHERE r.node_id=(SELECT node_id FROM nodes WHERE name=?) AND r.seq < ?"
            " AND r.kind=? ORDER BY r.seq DESC LIMIT 1", (node, seq, kind)))
        return recs[0] if recs else None

    def records_until(self, node: str | None, time_ns: int,
                      kinds: Sequence[str]) -> Iterator[StoredRecord]:
        """Records of some kinds up to an instant, per node in chain order (replay)."""
        marks = ",".join("?" * len(kinds))
        where = f"WHERE r.time_ns <= ? AND r.kind IN ({marks})"
        args: list[Any] = [time_ns, *kinds]
        if node is not None:
            where += " AND n.name=?"
            args.append(node)
        return self._records(where + " ORDER BY r.node_id, r.seq", args)

    def records_of_kind(self, kinds: Sequence[str], node: str | None = None
                        ) -> Iterator[StoredRecord]:
        marks = ",".join("?" * len(kinds))
        where = f"WHERE r.kind IN ({marks})"
        args: list[Any] = list(kinds)
        if node is not None:
            where += " AND n.name=?"
            args.append(node)
        return self._records(where + " ORDER BY r.node_id, r.seq", args)
