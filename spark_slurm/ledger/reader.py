"""Read-only access to a ledger file, for tools that must never write to it.

`sparkctl ledger show`, audit and merge read a live node ledger while the daemon
appends; a read-only SQLite connection sees a consistent snapshot and cannot
disturb the writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from spark_slurm.ledger.checkpoint import Checkpoint, parse_checkpoint
from spark_slurm.ledger.records import Record
from spark_slurm.ledger.schema import SELECT_ALL, SELECT_JOB, open_existing, row_to_record


def read_records(path: str | os.PathLike[str], job_id: str | None = None,
                 since: int | None = None, kinds: Iterable[str] | None = None
                 ) -> Iterator[Record]:
    """Records of a ledger file in seq order (`since` inclusive), read-only."""
    conn, _ = open_existing(path)
    try:
        args: dict[str, Any] = {
            "since": since or 0, "job": job_id,
            "kinds": None if kinds is None else json.dumps(sorted(set(kinds)))}
        sql = SELECT_ALL if job_id is None else SELECT_JOB
        while True:
            rows = conn.execute(sql, args).fetchall()
            for row in rows:
                yield row_to_record(row)
            if len(rows) < 1000:
                return
            args["since"] = int(rows[-1][0]) + 1
    finally:
        conn.close()


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
