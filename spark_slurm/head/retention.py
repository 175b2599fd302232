"""`sparkctl prune`: drop old records from the cluster store, and keep them verifiable.

Records older than a cut go (on PostgreSQL, whole monthly partitions are
dropped; in SQLite, rows are deleted), per node from its genesis (which stays, to
name the node's keys) up to the first record kept. Three things anchor the cut so
that everything kept still verifies exactly as before: the hash of the last record
removed (`nodes.anchor`: the first kept record's link is checked against it), the
leaves of the removed records in the 256-leaf block the cut falls in
(`cut_leaves`: the proofs of kept records in that block need them), and the
stored perfect subtrees and checkpoints, which are never removed. The head
record is always kept: the next merge continues from it.

With `--archive FILE`, the records removed first go into an SQLite cluster store
at FILE (created, or extended where the last prune into it stopped), with the
checkpoints, subtrees, leaves and findings that prove them: `sparkctl audit JOBID
--db FILE` audits an archived job with the same proofs as before.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.errors import HeadDbError
from spark_slurm.head.proofs import node_tree
from spark_slurm.head.sqlite_store import SqliteStore, signers_text
from spark_slurm.head.store import Maintenance, NodeState, PruneNote, display_url, open_store
from spark_slurm.ledger.chain import SUBTREE_LEVEL

BLOCK = 1 << SUBTREE_LEVEL
"""A cut keeps the leaves from the last multiple of BLOCK before it: every proof
over the records kept then finds stored subtrees or leaves."""


@dataclass(frozen=True, slots=True)
class NodeCut:
    node: str
    first_seq: int
    removed: int
    archived: int

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "first_seq": self.first_seq, "removed": self.removed,
                "archived": self.archived}


@dataclass
class PruneReport:
    db: str
    before_ns: int
    archive: str | None
    nodes: list[NodeCut] = field(default_factory=list)
    partitions: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(n.removed for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"db": self.db, "before_ns": self.before_ns, "archive": self.archive,
                "removed": self.removed, "partitions": self.partitions,
                "nodes": [n.to_json() for n in self.nodes]}


def pruned_from_store(notes: list[PruneNote]) -> str:
    """Where an old job's records went: the newest cut, and every archive written."""
    newest = max(n.before_ns for n in notes)
    when = dt.datetime.fromtimestamp(newest // 10**9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    archives = list(dict.fromkeys(n.archive for n in notes if n.archive is not None))
    if not archives:
        return f"records before {when} were pruned from this store without an archive"
    return (f"records before {when} were pruned from this store; archived in "
            f"{', '.join(archives)}: sparkctl audit JOBID --db ARCHIVE")


def prune(db: str | Path, before_ns: int, archive: Path | None = None) -> PruneReport:
    """Remove every node's records before `before_ns` (see the module docstring)."""
    with closing(open_store(db)) as store, store.maintenance() as m:
        cuts, partitions = m.cut_points(before_ns)
        report = PruneReport(display_url(store.url), before_ns,
                             str(archive) if archive is not None else None,
                             partitions=list(partitions))
        out = _open_archive(archive) if archive is not None else None
        try:
            for state in m.nodes():
                first = cuts.get(state.node_id)
                if first is None or first <= state.first_seq:
                    continue
                archived = _archive(m, out, state, first) if out is not None else 0
                block = max(1, first - first % BLOCK)  # the genesis stays among the records
                leaves = [(block + i, leaf) for i, leaf in
                          enumerate(m.leaves(state.node_id, block, first - block))]
                anchor = m.hash_at(state.node_id, first - 1)
                removed = m.set_cut(state, first, anchor, leaves)
                report.nodes.append(NodeCut(state.name, first, removed, archived))
            m.drop(partitions)
            if report.removed or partitions:
                m.note_prune(PruneNote(before_ns, report.archive))
            if out is not None:
                out.conn.execute("COMMIT")
        except BaseException:
            if out is not None and out.conn.in_transaction:
                out.conn.execute("ROLLBACK")
            raise
        finally:
            if out is not None:
                out.close()
    return report


def _open_archive(path: Path) -> SqliteStore:
    store = SqliteStore.open(path, create=True)
    store.conn.execute("BEGIN IMMEDIATE")
    return store


def _archive(m: Maintenance, out: SqliteStore, state: NodeState, first: int) -> int:
    """Extend the archive's copy of the node with its records before `first`, with
    what proves them; returns how many records went in."""
    conn = out.conn
    kept = conn.execute("SELECT node_id, head_seq FROM nodes WHERE name=?",
                        (state.name,)).fetchone()
    start = state.first_seq
    if kept is None:
        node_id = int(conn.execute(
            "INSERT INTO nodes(name, origin, first_seq, anchor) VALUES (?,?,?,?)",
            (state.name, state.origin, state.first_seq, state.anchor)).lastrowid or 0)
        genesis = next(iter(m.rows(state.node_id, 0, 0)), [])
        if start > 0:
            _insert(conn, node_id, genesis)
            conn.executemany("INSERT OR REPLACE INTO cut_leaves VALUES (?,?,?)",
                             [(node_id, s, leaf) for s, leaf in _old_cut(m, state)])
    else:
        node_id, head = int(kept[0]), kept[1]
        if head is not None and int(head) + 1 != start and start > 0:
            raise HeadDbError(f"{out.path}: archive of node {state.name} ends at seq {head}, "
                              f"the store now starts at seq {start}: archive elsewhere")
    count = 0
    for page in m.rows(state.node_id, start, first - 1):
        _insert(conn, node_id, page)
        count += len(page)
    size = first
    tree = node_tree(m, state.node_id, size)
    frontier, at = [], 0
    try:
        for k in range(size.bit_length() - 1, -1, -1):
            if size >> k & 1:
                frontier.append(tree.subtree(at, at + (1 << k)))
                at += 1 << k
    except ValueError as exc:
        raise HeadDbError(f"{out.path}: cannot archive node {state.name}: {exc}") from None
    head_hash = m.hash_at(state.node_id, first - 1)
    conn.execute("UPDATE nodes SET head_seq=?, head_hash=?, count=count+?, frontier=?,"
                 " signers=? WHERE node_id=?",
                 (first - 1, head_hash.hex() if head_hash else None, count, b"".join(frontier),
                  signers_text(state.signers), node_id))
    _copy_proofs(m, conn, state, node_id, first)
    return count


def _old_cut(m: Maintenance, state: NodeState) -> list[tuple[int, bytes]]:
    """The leaves an earlier cut kept (the block before the store's first record)."""
    block = max(1, state.first_seq - state.first_seq % BLOCK)
    return [(block + i, leaf) for i, leaf in
            enumerate(m.leaves(state.node_id, block, state.first_seq - block))]


def _insert(conn: sqlite3.Connection, node_id: int, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany("INSERT OR IGNORE INTO records(node_id, seq, time_ns, kind, job_id, body,"
                     " prev_hash, hash, mac, key_id, ref_seq, leaf) VALUES"
                     " (?,?,?,?,?,?,?,?,?,?,?,?)", [(node_id, *r) for r in rows])


def _copy_proofs(m: Maintenance, conn: sqlite3.Connection, state: NodeState, node_id: int,
                 size: int) -> None:
    """Checkpoints within the archived size, subtrees wholly inside it, findings."""
    for cp in m.checkpoints(state.node_id):
        if cp.size <= size:
            conn.execute("INSERT OR IGNORE INTO checkpoints(node_id, size, root, text, source)"
                         " VALUES (?,?,?,?,?)", (node_id, cp.size, cp.root, cp.text, cp.source))
    for level in range(SUBTREE_LEVEL, max(SUBTREE_LEVEL + 1, size.bit_length())):
        for idx in range(size >> level):
            value = m.subtree(state.node_id, level, idx)
            if value is not None:
                conn.execute("INSERT OR REPLACE INTO subtrees VALUES (?,?,?,?)",
                             (node_id, level, idx, value))
    for f in m.findings(state.name):
        conn.execute("INSERT OR IGNORE INTO findings(code, node, seq, detail, source,"
                     " first_seen_ns) VALUES (?,?,?,?,?,?)",
                     (f.code, f.node, f.seq, f.detail, "archive", 0))
