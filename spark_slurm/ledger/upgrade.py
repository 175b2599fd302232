"""Upgrading a schema-1 ledger to schema 2 in place, once, when its writer opens it.

Schema 2 adds an index by kind, the `tree` table of stored Merkle subtrees and
the `state` rows naming each ingest source's newest record. Nothing hashed changes: the
records, their chain, the checkpoints and the saved frontier stay byte for
byte, so every checkpoint a head node or auditor kept still verifies. The
subtrees are hashed from the stored bytes in one streaming pass (seq pages,
O(log n) state), in the same transaction as the indexes and the new
`meta.schema_version`, so a crash leaves either version, whole.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

from spark_slurm.ledger.chain import Chain
from spark_slurm.ledger.merkle import leaf_hash
from spark_slurm.ledger.schema import (
    INGEST_MARKS,
    INSERT_TREE,
    SCHEMA_VERSION,
    UPGRADE_V2,
    statements,
)

log = logging.getLogger("spark.ledger")
PAGE = 4096


def upgrade(conn: sqlite3.Connection, path: Path, meta: dict[str, str]) -> dict[str, str]:
    """Bring the ledger on `conn` (open for writing) to SCHEMA_VERSION; returns its meta."""
    if meta["schema_version"] == str(SCHEMA_VERSION):
        return meta
    started = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements(UPGRADE_V2):
            conn.execute(statement)
        count = fill_tree(conn)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.info("%s: upgraded ledger schema %s -> %s (%d records) in %.1f s", path,
             meta["schema_version"], SCHEMA_VERSION, count, time.monotonic() - started)
    return dict(meta, schema_version=str(SCHEMA_VERSION))


def fill_tree(conn: sqlite3.Connection) -> int:
    """Insert every stored subtree of the records' Merkle tree and the newest record
    of each ingest source into `state`; returns the count read."""
    chain = Chain()
    chain.subtrees = []
    latest: dict[str, int] = {}
    seq = 0
    while rows := conn.execute("SELECT seq, CAST(body AS BLOB) FROM per WHERE seq >= ? "
                               "ORDER BY seq LIMIT ?", (seq, PAGE)).fetchall():
        chain.add_leaves([leaf_hash(body) for _, body in rows])
        conn.executemany(INSERT_TREE, chain.subtrees)
        chain.subtrees.clear()
        for at, body in rows:
            for source, mark in INGEST_MARKS:
                if mark in body and _source(body) == source:
                    latest[source] = int(at)
        seq = int(rows[-1][0]) + 1
    conn.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)",
                     [(f"latest.{src}", str(at).encode()) for src, at in latest.items()])
    return chain.size


def _source(body: bytes) -> object:
    try:
        return json.loads(body)["body"].get("source")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
