"""Consistent copies of a live ledger with SQLite's online backup API.

The head node's nightly merge copies node ledgers this way so the daemon, still
appending, is never blocked for long and the copy is a valid ledger at one
instant (WAL content included).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from spark_slurm.errors import LedgerError
from spark_slurm.ledger.schema import connect, open_existing


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where the copy went and what it holds."""

    source: str
    dest: str
    count: int
    head: str | None


def snapshot(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Snapshot:
    """Copy ledger `source` to the new file `dest` (refuses to overwrite)."""
    src_path, dest_path = Path(source), Path(dest)
    if dest_path.exists():
        raise LedgerError(f"{dest_path}: already exists; refusing to overwrite")
    src, _ = open_existing(src_path)
    try:
        out = connect(dest_path, readonly=False)
        try:
            src.backup(out, pages=1024)
            out.execute("PRAGMA journal_mode = WAL")
            row = out.execute("SELECT seq, hash FROM per ORDER BY seq DESC LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            out.close()
            dest_path.unlink(missing_ok=True)
            raise LedgerError(f"{src_path}: backup to {dest_path} failed: {exc}") from None
        out.close()
    finally:
        src.close()
    return Snapshot(str(src_path), str(dest_path), 0 if row is None else int(row[0]) + 1,
                    None if row is None else bytes(row[1]).hex())
