"""Bringing a schema-1 SQLite cluster store up to schema 2, in place, once.

Schema 2 keeps, per node, the Merkle compact range and the signing keys followed
(so a merge reads only new rows) and every perfect subtree of 256 leaves or more
(so a proof reads O(log n) hashes). A schema-1 store has the leaves and records
to derive them: each node's leaves are streamed through the ledger's `Chain` and its
genesis and key records give the keys. One transaction: a failed upgrade leaves
the store as it was.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

from spark_slurm.errors import HeadDbError, LedgerKeyError
from spark_slurm.head.scan import follow_rotation
from spark_slurm.ledger.chain import Chain
from spark_slurm.ledger.keys import public_from_raw, public_raw

_CHUNK = 65536
_STEPS = (
    "ALTER TABLE nodes ADD COLUMN frontier BLOB NOT NULL DEFAULT x''",
    "ALTER TABLE nodes ADD COLUMN signers TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE nodes ADD COLUMN first_seq INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE nodes ADD COLUMN anchor BLOB",
    "CREATE TABLE subtrees (node_id INTEGER NOT NULL, level INTEGER NOT NULL,"
    " idx INTEGER NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (node_id, level, idx))"
    " WITHOUT ROWID",
    "CREATE TABLE cut_leaves (node_id INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " leaf BLOB NOT NULL, PRIMARY KEY (node_id, seq)) WITHOUT ROWID",
    # schema 1 kept a finding with no seq again on every merge (NULLs are distinct)
    "DELETE FROM findings WHERE seq IS NULL AND id NOT IN (SELECT min(id) FROM findings"
    " WHERE seq IS NULL GROUP BY code, node, detail)",
    "CREATE UNIQUE INDEX findings_once ON findings(code, node, ifnull(seq, -1), detail)",
)


def upgrade_sqlite(conn: sqlite3.Connection, path: Path) -> None:
    """Upgrade an open schema-1 store (autocommit connection) to schema 2."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        for step in _STEPS:
            conn.execute(step)
        for node_id, count in conn.execute("SELECT node_id, count FROM nodes").fetchall():
            _node(conn, int(node_id), int(count))
        conn.execute("DROP TABLE IF EXISTS merkle_blocks")
        conn.execute("UPDATE head_meta SET value='2' WHERE key='schema'")
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        conn.execute("ROLLBACK")
        raise HeadDbError(f"{path}: cannot upgrade the cluster ledger to schema 2: "
                          f"{exc}") from None


def _node(conn: sqlite3.Connection, node_id: int, count: int) -> None:
    frontier = Chain()
    frontier.subtrees = []
    at = 0
    while at < count:
        leaves = [bytes(r[0]) for r in conn.execute(
            "SELECT leaf FROM records WHERE node_id=? AND seq >= ? AND seq < ? ORDER BY seq",
            (node_id, at, at + _CHUNK))]
        if not leaves:
            break
        frontier.add_leaves(leaves)
        conn.executemany("INSERT OR REPLACE INTO subtrees VALUES (?,?,?,?)",
                         [(node_id, lv, i, h) for lv, i, h in frontier.subtrees])
        frontier.subtrees.clear()
        at += len(leaves)
    conn.execute("UPDATE nodes SET frontier=?, signers=? WHERE node_id=?",
                 (frontier.to_bytes(), json.dumps(_signers(conn, node_id)), node_id))


def _signers(conn: sqlite3.Connection, node_id: int) -> list[str]:
    """The genesis signing key and every endorsed rotation after it (base64 raw)."""
    rows = conn.execute("SELECT kind, CAST(body AS BLOB) FROM records WHERE node_id=? AND"
                        " (seq = 0 OR kind = 'key') ORDER BY seq", (node_id,)).fetchall()
    keys = []
    origin = ""
    for kind, raw in rows:
        try:
            body = json.loads(raw)["body"]
        except (ValueError, KeyError, TypeError):
            continue
        if kind == "genesis" and isinstance(body.get("signing_public_key"), str):
            try:
                keys.append(public_from_raw(base64.b64decode(body["signing_public_key"])))
            except (ValueError, LedgerKeyError):
                return []
            origin = f"spark/{body.get('cluster', 'spark')}/{body.get('node', '')}"
        elif kind == "key" and keys and body.get("event") == "rotate" \
                and follow_rotation(body, origin, keys)[0] is not None:
            break
    return [base64.b64encode(public_raw(k)).decode() for k in keys]
