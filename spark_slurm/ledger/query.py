"""Reads of a ledger's records that touch only what they return.

Every read is a run of short pages keyed by seq (never one statement over the
whole table, never the whole result in memory), and each filter goes through an
index: the primary key for seq ranges (a record's follow-ups are read forward
from it for a bounded time), `per_job` for a job, and in schema 2 `per_rare` for
the rare kinds start-up looks up (one index range per kind, merged in seq order)
and the `state` row that names each ingest source's newest record. Other kind
filters scan seq ranges: they are asked within a job's range or from the head
back to the last start-up. A schema-1 file (read-only tools may meet one) lacks
`per_rare`, so there every kind filter scans; the writer upgrades its own ledger
at open.

`Ledger` (under its lock) and the read-only tools (`reader.LedgerReader`) run
these same queries, so the daemon, `sparkctl ledger show` and a node-ledger
audit read records the same way.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from spark_slurm.ledger.records import Record
from spark_slurm.ledger.schema import RARE_KINDS, row_to_record

PAGE = 1000
FIRST_PAGE = 16
"""Pages grow from FIRST_PAGE rows to PAGE (x4 each time): a reader that wants the
newest few of six kinds reads a few dozen rows, not six thousand."""
Fetch = Callable[[str, Sequence[Any]], list[Any]]
"""Runs one query and returns all its rows (a page at most)."""

# Written out in full (no string building): each is one fixed statement.
_ASC = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id FROM per "
        "WHERE seq >= ? AND seq < ? ORDER BY seq LIMIT ?")
_DESC = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id FROM per "
         "WHERE seq <= ? AND seq >= ? ORDER BY seq DESC LIMIT ?")
# per_rare is used only when the WHERE repeats its condition
_KIND_ASC = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id "
             "FROM per INDEXED BY per_rare "
             "WHERE (kind = 'genesis' OR kind = 'key' OR kind = 'policy' OR kind = 'reconcile') "
             "AND kind = ? AND seq >= ? AND seq < ? ORDER BY seq LIMIT ?")
_KIND_DESC = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id "
              "FROM per INDEXED BY per_rare "
              "WHERE (kind = 'genesis' OR kind = 'key' OR kind = 'policy' OR kind = 'reconcile') "
              "AND kind = ? AND seq <= ? AND seq >= ? ORDER BY seq DESC LIMIT ?")
_JOB = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id "
        "FROM per INDEXED BY per_job "
        "WHERE job_id = ? AND job_id IS NOT NULL AND seq >= ? AND seq < ? "
        "ORDER BY seq LIMIT ?")
_REF_SCAN = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id FROM per "
             "WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?")
FOLLOWUP_KINDS = ("facility", "recovery", "release")
"""Kinds that follow up an earlier record (`body.ref`, docs/per-schema.md)."""
FOLLOWUP_HORIZON_NS = 3600 * 1_000_000_000
"""Follow-ups are written within the facility window of what they follow (seconds,
or minutes at most; they are never carried over a restart): a search for them ends
at the first candidate written more than this after the record they follow."""
_END = 2**62
RARE = frozenset(RARE_KINDS)


class Reads:
    """Record queries over one connection; `fetch` runs a page (under a lock, for
    the writer) and `version` is the file's schema version."""

    def __init__(self, fetch: Fetch, version: int) -> None:
        self._fetch = fetch
        self.indexed = version >= 2

    def _pages(self, sql: str, args: list[Any], at: int, step: int) -> Iterator[Record]:
        """Run a page query again and again, moving args[at] one past the last seq
        read (in the direction of `step`); the page size is the last parameter."""
        limit = FIRST_PAGE
        while True:
            rows = self._fetch(sql, [*args, limit])
            for row in rows:
                yield row_to_record(row)
            if len(rows) < limit:
                return
            args[at] = int(rows[-1][0]) + step
            limit = min(PAGE, limit * 4)

    def records(self, job_id: str | None = None, since: int | None = None,
                kinds: Iterable[str] | None = None, until: int | None = None
                ) -> Iterator[Record]:
        """Records with since <= seq < until in seq order, of one job and/or kinds."""
        lo, hi = since or 0, _END if until is None else until
        wanted = None if kinds is None else frozenset(kinds)
        if job_id is not None:
            found = self._pages(_JOB, [job_id, lo, hi], 1, 1)
        elif wanted is not None and self.indexed and wanted <= RARE:
            return heapq.merge(*(self._pages(_KIND_ASC, [k, lo, hi], 1, 1)
                                 for k in sorted(wanted)), key=_seq)
        else:
            found = self._pages(_ASC, [lo, hi], 0, 1)
        return found if wanted is None else (r for r in found if r.kind in wanted)

    def newest_first(self, kinds: Iterable[str] | None = None, before: int | None = None,
                     since: int = 0) -> Iterator[Record]:
        """Records with since <= seq <= before from the newest back (start-up needs the
        latest few, not a year of history)."""
        hi = _END if before is None else before
        wanted = None if kinds is None else frozenset(kinds)
        if wanted is not None and self.indexed and wanted <= RARE:
            return heapq.merge(*(self._pages(_KIND_DESC, [k, hi, since], 1, -1)
                                 for k in sorted(wanted)), key=_seq, reverse=True)
        found = self._pages(_DESC, [hi, since], 0, -1)
        return found if wanted is None else (r for r in found if r.kind in wanted)

    def at(self, seq: int) -> Record | None:
        """The record at `seq`, if there is one."""
        return next(self.records(since=seq, until=seq + 1), None)

    def latest(self, kind: str, before: int | None = None) -> Record | None:
        """The newest record of a kind with seq < before (e.g. the policy in force)."""
        return next(self.newest_first([kind], None if before is None else before - 1), None)

    def followups(self, seq: int, time_ns: int) -> list[Record]:
        """Records of the follow-up kinds whose body's `ref.seq` is `seq` (written at
        `time_ns`), oldest first: the records after it are read forward until one
        written FOLLOWUP_HORIZON_NS after it, matched on the canonical bytes before
        their JSON is parsed."""
        tag = b'"ref":{'
        out = []
        end = time_ns + FOLLOWUP_HORIZON_NS
        for rec in self._pages(_REF_SCAN, [seq, _END], 0, 1):
            if rec.time_ns > end:
                break
            if rec.kind in FOLLOWUP_KINDS and tag in rec.body_bytes \
                    and b'"seq":%d' % seq in rec.body_bytes:
                ref = rec.body.get("ref")
                if isinstance(ref, dict) and ref.get("seq") == seq:
                    out.append(rec)
        return out

    def latest_ingested(self, source: str) -> Record | None:
        """The newest record whose body's `source` is `source` (one of
        schema.INGEST_SOURCES), from `state.latest.<source>`; a schema-1 file has
        no such row and is searched from the head back."""
        if self.indexed:
            rows = self._fetch("SELECT value FROM state WHERE key = ?", [f"latest.{source}"])
            if not rows:
                return None
            value = bytes(rows[0][0]) if isinstance(rows[0][0], bytes) else str(rows[0][0])
            seq = int(value)
            return self.at(seq)
        mark = b'"source":"%b"' % source.encode()
        for rec in self._pages(_DESC, [_END, 0], 0, -1):
            if mark in rec.body_bytes and rec.body.get("source") == source:
                return rec
        return None


def _seq(record: Record) -> int:
    return record.seq
