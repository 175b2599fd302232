"""Looking inside a cluster store the same way whichever backend holds it.

Tests compare what merge stored with the node ledgers byte for byte, and whole
stores with each other; these helpers run the same SQL (written with `?`
placeholders) on SQLite or PostgreSQL, whose tables have the same names and
columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from spark_slurm.head.store import ClusterStore, open_store

TABLES = ("nodes", "records", "subtrees", "cut_leaves", "checkpoints", "findings", "forks")
_SKIP = {"findings": ("id", "source", "first_seen_ns"), "records": ("part_ns",),
         "nodes": ("part_ns",)}


def query(store: ClusterStore, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of a statement (written with `?` placeholders) on either backend."""
    conn: Any = store.conn  # type: ignore[attr-defined]
    if store.url.startswith("postgres"):
        with conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), tuple(args))
            rows = cur.fetchall() if cur.description else []
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]
    return [tuple(r) for r in conn.execute(sql, tuple(args)).fetchall()]


def execute(db: str | Path, sql: str, args: Sequence[Any] = ()) -> None:
    """One statement against the store `db` names, committed (tampering with it)."""
    with closing(open_store(db)) as store:
        conn: Any = store.conn  # type: ignore[attr-defined]
        if store.url.startswith("postgres"):
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), tuple(args))
        else:
            conn.execute(sql, tuple(args))


def node_rows(db: str | Path, node: str) -> list[list[Any]]:
    """A node's stored records as `tamper.rows` reads a node ledger."""
    with closing(open_store(db)) as store:
        return [list(r) for r in query(
            store, "SELECT r.seq, r.time_ns, r.kind, r.job_id, r.body, r.prev_hash, r.hash,"
            " r.mac, r.key_id FROM records r JOIN nodes n ON n.node_id = r.node_id"
            " WHERE n.name = ? ORDER BY r.seq", (node,))]


def dump(db: str | Path) -> list[str]:
    """Everything a store holds, in a fixed order, nodes named rather than numbered
    (ids follow the order nodes were first seen), findings without when and from
    where they were seen: to compare two stores, or one before and after."""
    out: list[str] = []
    with closing(open_store(db)) as store:
        names = dict(query(store, "SELECT node_id, name FROM nodes"))
        for table in TABLES:
            cols = [c for c in _columns(store, table) if c not in _SKIP.get(table, ())]
            rows = query(store, f"SELECT {', '.join(cols)} FROM {table}")
            if "node_id" in cols:
                at = cols.index("node_id")
                rows = [(*r[:at], names.get(r[at], r[at]), *r[at + 1:]) for r in rows]
                if table == "nodes":
                    rows = [r[:at] + r[at + 1:] for r in rows]
            out.extend(sorted(f"{table}: {r!r}" for r in rows))
    return out


def _columns(store: ClusterStore, table: str) -> list[str]:
    if store.url.startswith("postgres"):
        return [r[0] for r in query(store, "SELECT column_name FROM information_schema.columns"
                                    " WHERE table_name = ? ORDER BY ordinal_position", (table,))]
    return [r[1] for r in query(store, f"PRAGMA table_info({table})")]
