"""`sparkctl ledger prune`: archive a node ledger's old records, then remove them.

A node ledger grows by what it writes (about 1 KB a record). Pruning archives
the records before a cut to a segment file (the one `sparkctl ledger export`
writes, so the head node merges and audits it like any other), checks the archive
holds every one of them, and only then removes them from the live ledger, keeping
what the node and its verifier still need (ledger/cut.py). The cut falls on a
multiple of CUT_ALIGN, before the head record and at or below the newest checkpoint:
the records kept are always covered by a signed checkpoint. Safe beside a running
sparkd: the removal is one short write transaction, computed beforehand from
records that never change (a ledger is append-only below its head).
"""

from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.clock import Clock, SystemClock
from spark_slurm.errors import LedgerError
from spark_slurm.ledger.cut import (
    CUT_ALIGN,
    KEPT_KINDS,
    MIN_ALIGN,
    Cut,
    CutProblem,
    compact_range,
    cut_of,
)
from spark_slurm.ledger.schema import (
    INGEST_SOURCES,
    check_file,
    connect,
    read_meta,
    row_to_record,
)
from spark_slurm.ledger.segment import export_segment
from spark_slurm.ledger.tree import ledger_tree

_KEPT = " OR ".join(f"kind = '{k}'" for k in KEPT_KINDS)


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did: records [previous, cut) went to `archive`, but `kept`."""

    path: str
    previous: int
    cut: int
    removed: int
    kept: int
    archive: str | None
    archived: int
    checkpoints_removed: int
    why: str = ""
    """Why nothing was pruned, when nothing was."""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "previous_cut": self.previous, "cut": self.cut,
                "removed": self.removed, "kept": self.kept, "archive": self.archive,
                "archived": self.archived, "checkpoints_removed": self.checkpoints_removed,
                "why": self.why}


def prune_ledger(path: str | os.PathLike[str], archive: str | os.PathLike[str], *,
                 before_seq: int | None = None, before_ns: int | None = None,
                 align: int = CUT_ALIGN, clock: Clock | None = None,
                 dry_run: bool = False) -> PruneResult:
    """Cut the ledger at the last multiple of `align` at or before `before_seq` (or
    the first record written at or after `before_ns`), the head record and the
    newest checkpoint; archive what goes to `archive` (a new file) first. With
    `dry_run`, only say what would be done (nothing is written)."""
    if (before_seq is None) == (before_ns is None):
        raise LedgerError("prune needs one of a seq or a time to cut before")
    if align <= 0 or align % MIN_ALIGN:
        raise LedgerError(f"a cut falls on a multiple of {MIN_ALIGN} records, not {align}")
    p, out = Path(path), Path(archive)
    if not check_file(p, allow_empty=False):
        raise LedgerError(f"{p}: no such ledger file")
    with closing(connect(p, readonly=False)) as conn:
        meta = read_meta(conn, p)
        if int(meta["schema_version"]) < 2:
            raise LedgerError(f"{p}: a schema-1 ledger keeps no Merkle subtrees to anchor a "
                              "cut: start sparkd on it once (it upgrades the file), then prune")
        old = cut_of(meta, str(p))
        previous = 0 if old is None else old.seq
        cut, why = _cut_point(conn, previous, before_seq, before_ns, align)
        if why:
            return PruneResult(str(p), previous, previous, 0, 0, None, 0, 0, why)
        if out.exists():
            raise LedgerError(f"{out}: exists; a prune never overwrites an archive")
        try:  # before anything is written: the cut must be stored subtrees
            compact_range(conn, cut)
        except CutProblem as exc:
            raise LedgerError(f"{p}: cannot cut at seq {cut}: {exc.reason}") from None
        kept = _kept_seqs(conn, previous, cut)
        if dry_run:
            checkpoints = conn.execute("SELECT count(*) FROM checkpoint WHERE size < ?",
                                       (cut,)).fetchone()[0]
            return PruneResult(str(p), previous, cut, cut - previous - len(kept), len(kept),
                               None, 0, int(checkpoints))
        seg = export_segment(p, out, previous - 1, cut - 1)
        anchor = _hash_at(conn, cut - 1, p)
        _check_archive(out, cut - previous, anchor)
        tree = ledger_tree(conn, cut)
        proofs = {s: (cut, tree.inclusion_proof(s)) for s in kept}
        now = (clock or SystemClock()).now_ns()
        new = Cut(cut, now, (*(old.archives if old else ()), out.name),
                  {**(old.kept if old else {}), **proofs})
        conn.execute("BEGIN IMMEDIATE")
        try:
            now_cut = conn.execute("SELECT value FROM meta WHERE key = 'cut'").fetchone()
            if now_cut != (None if old is None else (meta["cut"],)) \
                    or _hash_at(conn, cut - 1, p) != anchor:
                raise LedgerError(f"{p}: changed while being pruned (another prune?); try again")
            removed = _delete(conn, previous, cut, kept)
            checkpoints = conn.execute("DELETE FROM checkpoint WHERE size < ?", (cut,)).rowcount
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('cut', ?)",
                         (new.to_text(),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return PruneResult(str(p), previous, cut, removed, len(kept), str(out), seg.rows,
                       int(checkpoints))


def _cut_point(conn: sqlite3.Connection, previous: int, before_seq: int | None,
               before_ns: int | None, align: int) -> tuple[int, str]:
    """(cut, "") or (previous, why nothing can go)."""
    last = conn.execute("SELECT max(seq) FROM per").fetchone()[0]
    newest = conn.execute("SELECT size FROM checkpoint ORDER BY id DESC LIMIT 1").fetchone()
    if newest is None:
        return previous, ("the ledger has no checkpoint yet, and the records kept must be "
                          "covered by one")
    if before_seq is None:
        row = conn.execute("SELECT min(seq) FROM per WHERE seq >= ? AND time_ns >= ?",
                           (previous, before_ns)).fetchone()
        before_seq = int(last) + 1 if row[0] is None else int(row[0])
    limit = min(before_seq, int(last), int(newest[0]))
    cut = limit // align * align
    if cut <= previous:
        return previous, (f"no multiple of {align} records lies after the "
                          f"{'cut at seq ' + str(previous) if previous else 'genesis'} and "
                          f"at or before seq {before_seq}, the head (seq {last}) and the "
                          f"newest checkpoint (size {newest[0]})")
    return cut, ""


def _hash_at(conn: sqlite3.Connection, seq: int, p: Path) -> bytes:
    row = conn.execute("SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?", (seq,)).fetchone()
    if row is None or not isinstance(row[0], bytes):
        raise LedgerError(f"{p}: record {seq} is missing: verify the ledger before pruning")
    return bytes(row[0])


def _check_archive(out: Path, rows: int, anchor: bytes) -> None:
    """The archive must hold every record of the range, ending at the same hash."""
    with closing(sqlite3.connect(f"{out.resolve().as_uri()}?mode=ro", uri=True)) as seg:
        count, last = seg.execute("SELECT count(*), max(seq) FROM per").fetchone()
        tail = seg.execute("SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?",
                           (last,)).fetchone()
    if count != rows or tail is None or tail[0] != anchor:
        raise LedgerError(f"{out}: the archive does not hold the {rows} records it should; "
                          "nothing was pruned")


def _kept_seqs(conn: sqlite3.Connection, lo: int, hi: int) -> list[int]:
    """Records of [lo, hi) that stay: KEPT_KINDS, each ingest source's newest, and for
    each GPU the newest record that set its limit (sparkd's start-up reads the limit
    each GPU is governed at from the newest such record: `daemon.state`)."""
    seqs = {int(r[0]) for r in conn.execute(
        f"SELECT seq FROM per WHERE seq >= ? AND seq < ? AND ({_KEPT})", (lo, hi))}  # noqa: S608
    seqs |= _governing(conn, lo, hi)
    for source in INGEST_SOURCES:
        row = conn.execute("SELECT value FROM state WHERE key = ?",
                           (f"latest.{source}",)).fetchone()
        if row is not None:
            seq = int(bytes(row[0]) if isinstance(row[0], bytes) else row[0])
            if lo <= seq < hi:
                seqs.add(seq)
    return sorted(seqs)


_GPU_REF = re.compile(rb'"(?:index|gpu)":"?(-?\d+)')
"""Every GPU number a limit-setting record's canonical JSON can name: more than it
sets, never fewer, so a record naming no GPU not yet settled is skipped unparsed."""


def _governing(conn: sqlite3.Connection, lo: int, hi: int) -> set[int]:
    """Newest first, for each GPU the record that last set its limit (sparkd's own
    rule, `daemon.state.limits_set_by`)."""
    from spark_slurm.daemon.state import GOVERNING_KINDS, limits_set_by  # noqa: PLC0415

    marks = ",".join("?" * len(GOVERNING_KINDS))
    rows = conn.execute("SELECT seq, time_ns, kind, job_id, CAST(body AS BLOB), prev_hash, hash,"  # noqa: S608
                        f" mac, key_id FROM per WHERE seq >= ? AND seq < ? AND kind IN ({marks})"
                        " ORDER BY seq DESC", (lo, hi, *GOVERNING_KINDS))
    settled: set[int] = set()
    keep: set[int] = set()
    for row in rows:
        if {int(n) for n in _GPU_REF.findall(row[4])} <= settled:
            continue
        try:
            new = {gpu for gpu, _ in limits_set_by(row_to_record(row))} - settled
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(f"record {row[0]} cannot be read ({exc}): verify the ledger "
                              "before pruning it") from None
        if new:
            keep.add(int(row[0]))
            settled |= new
    return keep


def _delete(conn: sqlite3.Connection, lo: int, hi: int, kept: list[int]) -> int:
    """Remove [lo, hi) but `kept`, between the kept ones (each run is one range delete)."""
    removed, at = 0, lo
    for stop in [*kept, hi]:
        if stop > at:
            removed += conn.execute("DELETE FROM per WHERE seq >= ? AND seq < ?",
                                    (at, stop)).rowcount
        at = stop + 1
    return removed
