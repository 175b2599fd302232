"""Read-only access to a ledger file, for tools that must never write to it.

`sparkctl ledger show`, audit and merge read a live node ledger while the daemon
appends; a read-only SQLite connection sees a consistent snapshot and cannot
disturb the writer. `LedgerReader` is what an audit of one job on a node ledger
needs: the job's records, the node events around them, follow-ups, the newest
checkpoint and inclusion proofs against it, each through an index, so the cost
follows the job, not the ledger (see `query` and `tree`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from spark_slurm.errors import LedgerError
from spark_slurm.ledger.checkpoint import Checkpoint, parse_checkpoint
from spark_slurm.ledger.query import Reads
from spark_slurm.ledger.records import Record
from spark_slurm.ledger.schema import open_existing, schema_version
from spark_slurm.ledger.tree import StoredTree, ledger_tree


class LedgerReader:
    """One ledger file, read-only, in one read snapshot. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn, self.meta = open_existing(self.path)
        try:
            self._conn.execute("BEGIN")  # one snapshot for every read below
            self.version = schema_version(self.meta)
            self._reads = Reads(self._fetch, self.version)
            last = self._conn.execute("SELECT seq, hash FROM per ORDER BY seq DESC LIMIT 1"
                                      ).fetchone()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise LedgerError(f"{self.path}: unreadable SQLite database: {exc}") from None
        self.size = 0 if last is None else int(last[0]) + 1
        """Records held (the newest seq + 1), in this snapshot."""
        self.head = None if last is None else bytes(last[1]).hex()
        self.node = self.meta["node"]
        self.cluster = self.meta["cluster"]

    def _fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: unreadable SQLite database: {exc}") from None

    def records(self, job_id: str | None = None, since: int | None = None,
                kinds: Iterable[str] | None = None, until: int | None = None
                ) -> Iterator[Record]:
        """Records with since <= seq < until in seq order, of one job and/or kinds."""
        return self._reads.records(job_id, since, kinds, until)

    def job_records(self, job_id: str) -> list[Record]:
        """Every record indexed under the job id, in seq order (the `per_job` index)."""
        return list(self._reads.records(job_id=job_id))

    def newest_first(self, kinds: Iterable[str] | None = None,
                     before: int | None = None) -> Iterator[Record]:
        """Records with seq <= before, newest first."""
        return self._reads.newest_first(kinds, before)

    def record(self, seq: int) -> Record | None:
        """The record at `seq`."""
        return self._reads.at(seq)

    def latest(self, kind: str, before: int | None = None) -> Record | None:
        """The newest record of `kind` with seq < before (e.g. the policy in force)."""
        return self._reads.latest(kind, before)

    def followups(self, seq: int) -> list[Record]:
        """Follow-ups (facility, recovery, release) whose body's `ref.seq` is `seq`,
        oldest first (see query.Reads.followups for how far it looks)."""
        rec = self.record(seq)
        return [] if rec is None else self._reads.followups(seq, rec.time_ns)

    def latest_ingested(self, source: str) -> Record | None:
        """The newest record ingested from `source` ("journal" or "spool")."""
        return self._reads.latest_ingested(source)

    def checkpoints(self) -> list[Checkpoint]:
        """Checkpoints kept in the file, oldest first (unverified: see verify)."""
        rows = self._fetch("SELECT text FROM checkpoint ORDER BY id", ())
        return [parse_checkpoint(str(t)) for (t,) in rows]

    def latest_checkpoint(self, max_size: int | None = None) -> Checkpoint | None:
        """The newest stored checkpoint covering at most `max_size` records."""
        rows = self._fetch("SELECT text FROM checkpoint WHERE size <= ? ORDER BY id DESC "
                           "LIMIT 1", (self.size if max_size is None else max_size,))
        return parse_checkpoint(str(rows[0][0])) if rows else None

    def tree(self, size: int | None = None, *, stored: bool = True) -> StoredTree:
        """The Merkle tree over the first `size` records (all by default); with
        `stored=False` every subtree is hashed from the records' bytes, not read
        from the subtrees the writer kept (a second opinion on those)."""
        return ledger_tree(self._conn, self.size if size is None else size,
                           stored=stored and self.version >= 2)

    def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """Audit path of record `seq` in the tree of the first `size` records."""
        try:
            return self.tree(size).inclusion_proof(seq)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: unreadable SQLite database: {exc}") from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LedgerReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_records(path: str | os.PathLike[str], job_id: str | None = None,
                 since: int | None = None, kinds: Iterable[str] | None = None
                 ) -> Iterator[Record]:
    """Records of a ledger file in seq order (`since` inclusive), read-only."""
    with LedgerReader(path) as reader:
        yield from reader.records(job_id, since, kinds)


def ledger_meta(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's meta table (node, cluster, format, schema version, ...)."""
    conn, meta = open_existing(path)
    conn.close()
    return meta


def latest_checkpoint(path: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest checkpoint kept in the ledger, for export to a head node or auditor."""
    conn, _ = open_existing(path)
    try:
        row = conn.execute("SELECT text FROM checkpoint ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    return None if row is None else parse_checkpoint(str(row[0]))
