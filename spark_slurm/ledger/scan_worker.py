"""The verifier's scan of a seq range: every per-record check, in one streaming pass.

`scan` reads rows [lo, hi) in pages and checks, per row: the next seq, the prev
link and the hash (`Chain.accept`, with the Merkle tree), the column types, the
columns against the hashed envelope and, in an unchanged epoch, the MAC. Rows
that move verifier state (genesis, key records, a new key id) are handed to
`on_special` page by page, in seq order, before any later failure is reported;
the caller runs them through `verify_walk.slow_row`. The sequential verifier
scans the whole ledger with it in-process; the parallel one runs it in worker
processes over aligned chunks. State is O(log n) plus one page.

A row the fast checks refuse is re-read with every column CAST to the bytes the
format hashes and checked carefully, in the documented order, to name the
failure: a TEXT-stored body with the right bytes is not tampering.

Stdlib only, and runnable as a script (`python -E -s -S scan_worker.py`: pickled
tasks on stdin, pickled results on stdout) so verify_par starts clean worker
processes in milliseconds without forking a process that holds SQLite
connections and without re-importing the caller's __main__.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__:
    from spark_slurm.ledger import hmac_epochs
    from spark_slurm.ledger.chain import GENESIS_PREV, Chain
else:  # run as a script: the sibling modules, without the package's imports
    import hmac_epochs  # type: ignore[import-not-found,no-redef]
    from chain import GENESIS_PREV, Chain  # type: ignore[import-not-found,no-redef]

PAGE = 512
"""Rows per fetch. Each page's bodies are read several times (envelope tail, link
hash, leaf hash, ingest marks): at ~1 KB a row, 512 rows stay in a core's L2 cache;
4096 (5 MB) did not, and the scan was ~20 % slower per row."""
INGEST_SOURCES = ("journal", "spool")
"""= schema.INGEST_SOURCES: the verifier finds each one's newest record (the writer
keeps `state.latest.<source>`), by its canonical bytes first, then its JSON."""
_MARKS = tuple((src, b'"source":"' + src.encode() + b'"') for src in INGEST_SOURCES)
CACHE = 4096
"""Envelope parts cached per kind and per job id; a cache that holds this many
starts over (records of a job are near each other), so memory stays flat."""
MAX_SPECIAL = 4096
MAX_SPECIAL_TOTAL = 65536
"""A worker holding more state-moving rows than these, in one chunk or in all of
its chunks, gives up (the caller then scans in-process, where they are consumed
page by page): an honest ledger has a couple per HMAC epoch."""
_CAREFUL = ("key", "genesis")
"""Kinds that always take the careful path (slow_row): they move state, and a
genesis anywhere but seq 0 is refused there."""
_SELECT = ("SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id FROM per "
           "WHERE seq >= ? AND seq < ? ORDER BY seq")
# the bytes the format hashes, whichever storage class (TEXT or BLOB) a row uses
_SELECT_CAST = ("SELECT seq, time_ns, kind, job_id, CAST(body AS BLOB), "
                "CAST(prev_hash AS BLOB), CAST(hash AS BLOB), CAST(mac AS BLOB), key_id "
                "FROM per WHERE seq = ?")

Special = tuple[int, str, bytes, bytes, bytes | None, str | None]
"""(seq, kind, stored bytes, hash, mac, key id) of a row that moves verifier state."""
Task = tuple[str, int, int, str | None, bytes | None, tuple[int, ...], bytes | None]
"""(path, lo, hi, hmac id, K[0] or None, tree sizes in (lo, hi] to report, the head
to start from when record lo-1 was pruned: the chunk at a ledger's cut)."""
Result = tuple[tuple[int, str] | None, list[Special], int, bytes, list[bytes],
               list[tuple[int, list[bytes], bytes]], int, int, dict[str, int]]
"""(first failure as (seq, reason) or None, state-moving rows, next seq, head hash,
local compact range, [(size, compact range, head) per mark], subtree count, subtree
sum, newest seq per ingest source)."""


class Abort(Exception):
    """The scan cannot go on for a reason that is not a finding (too many special rows)."""


def _json_str(value: str) -> str:
    """JSON of a string as the writer makes it (ensure_ascii off)."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def _kind_part(kind: str) -> bytes:
    return b',"kind":%b,"seq":' % _json_str(kind).encode()


def _job_part(job_id: str) -> bytes:
    return b',"job":%b' % _json_str(job_id).encode()


def envelope_tail(kind: str, job_id: str | None) -> bytes:
    """records.envelope_suffix up to and including '"seq":'."""
    job = "null" if job_id is None else _json_str(job_id)
    return f',"job":{job},"kind":{_json_str(kind)},"seq":'.encode()


def subtree_digest(level: int, idx: int, h: bytes) -> int:
    """One stored subtree's term in the multiset hash `verify` compares with the
    `tree` table: order-free, so chunks and the table can be summed any way."""
    return int.from_bytes(hashlib.sha256(b"%d %d " % (level, idx) + h).digest(), "big")


class Scan:
    """Checks of one pass; see the module docstring."""

    def __init__(self, conn: sqlite3.Connection, lo: int, head: bytes, *,
                 hmac_id: str | None, k0: bytes | None, need: Sequence[int],
                 on_special: Callable[[list[Special]], None]) -> None:
        self.conn = conn
        self.chain = Chain(lo, (), head, base=lo)
        self.chain.marks = frozenset(need)
        self.chain.subtrees = []
        self.hmac_id = hmac_id
        self.keys = hmac_epochs.EpochKeys(k0) if k0 is not None else None
        self.on_special = on_special
        self.special: list[Special] = []
        self.kinds: dict[str, bytes] = {}  # envelope parts as JSON, bounded caches
        self.jobs: dict[str | None, bytes] = {None: b',"job":null'}
        self.macs: dict[int, Callable[[bytes], bytes]] = {}  # epoch -> MAC, key fixed
        self.fast_key_id: str | None = None  # key id of the current run of plain rows
        self.fast_mac: Callable[[bytes], bytes] | None = None
        self.subtree_count = 0
        self.subtree_sum = 0
        self.latest: dict[str, int] = {}  # ingest source -> newest seq seen

    def run(self, hi: int) -> tuple[int, str] | None:
        """Check [chain.size, hi); the first failure as (seq, reason), or None."""
        conn = self.conn
        lenient = conn.text_factory
        conn.text_factory = str  # the C decoder; invalid UTF-8 goes to _damaged
        try:
            cur = conn.execute(_SELECT, (self.chain.size, hi))
            while True:
                at = self.chain.size
                try:
                    rows = cur.fetchmany(PAGE)
                except (sqlite3.DatabaseError, UnicodeDecodeError):
                    conn.text_factory = lenient
                    return self._damaged(at, hi)
                if not rows:
                    return None
                bad = self.page(rows)
                self._flush()
                if bad is not None:
                    return bad
        except (sqlite3.DatabaseError, UnicodeDecodeError):
            conn.text_factory = lenient
            return self._damaged(self.chain.size, hi)
        finally:
            conn.text_factory = lenient

    def _flush(self) -> None:
        if self.special:
            self.on_special(self.special)
            self.special = []
        subs = self.chain.subtrees
        if subs:
            self.subtree_count += len(subs)
            self.subtree_sum += sum(subtree_digest(*s) for s in subs)
            subs.clear()

    def _damaged(self, at: int, hi: int) -> tuple[int, str] | None:
        """A page SQLite cannot read (or text that is not UTF-8): re-read row by row,
        text decoded leniently, to blame the right record."""
        if self.conn.text_factory is str:
            self.conn.text_factory = _lenient
        try:
            cur = self.conn.execute(_SELECT, (at, hi))
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            return (at, f"SQLite cannot read the record: {exc}")
        while True:
            try:
                row = cur.fetchone()
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                self._flush()
                return (self.chain.size, f"SQLite cannot read the record: {exc}")
            if row is None:
                return None
            bad = self.page([row])
            self._flush()
            if bad is not None:
                return bad

    def page(self, rows: list[Any]) -> tuple[int, str] | None:
        """Check one page of rows continuing the chain."""
        start = 0
        while start < len(rows):
            part = rows[start:] if start else rows
            saved = (len(self.special), self.fast_key_id, self.fast_mac)
            ok = self._fast(part)
            taken = self.chain.accept(part if ok == len(part) else part[:ok])
            if taken == len(part):
                return None
            if taken < ok:  # the fast checks looked past a row the chain refuses
                self._rewind(part[taken][0], saved)
            bad = self._careful(part[taken])
            if bad is not None:
                return bad
            start += taken + 1
        return None

    def _rewind(self, seq: int, saved: tuple[int, str | None, Any]) -> None:
        """Forget what `_fast` collected from `seq` on, and the key state it moved to."""
        mark, key_id, mac = saved
        special = self.special
        while len(special) > mark and special[-1][0] >= seq:
            special.pop()
        if len(special) > mark:
            last = special[-1]
            self.fast_key_id, self.fast_mac = self._run_key(last[1], last[0], last[5])
        else:
            self.fast_key_id, self.fast_mac = key_id, mac

    def _fast(self, rows: Sequence[Any]) -> int:
        """How many leading rows pass the column, envelope and MAC checks; rows that
        move state are collected for `on_special` instead of MAC-checked here. A
        page of plain rows (the usual case) is checked with list operations; any
        page where that does not simply pass is walked row by row."""
        n = len(rows)
        if self._plain_page(rows):
            return n
        # a page that does not pass whole usually holds one row that moves state (a
        # chunk's first row, an epoch's seal): past it, the rest may pass whole
        taken, moved = self._row_by_row(rows, stop_after_move=True)
        if not moved or taken == n:
            return taken
        rest = rows[taken:]
        if self._plain_page(rest):
            return n
        return taken + self._row_by_row(rest)[0]

    def _cache_parts(self, rows: Sequence[Any]) -> bool:
        """Put the envelope parts of the page's kinds and job ids in the caches (a
        node runs a new job every few records, so most pages bring new ones); False
        when one has the wrong type, which the row-by-row walk then names."""
        kinds, jobs = self.kinds, self.jobs
        new_kinds = {r[2] for r in rows}.difference(kinds)
        new_jobs = {r[3] for r in rows}.difference(jobs)
        if not all(type(k) is str for k in new_kinds) \
                or not all(type(j) is str for j in new_jobs):
            return False
        if len(kinds) + len(new_kinds) > CACHE:
            kinds.clear()
            new_kinds = {r[2] for r in rows}
        if len(jobs) + len(new_jobs) > CACHE:
            jobs.clear()
            jobs[None] = b',"job":null'
            new_jobs = {r[3] for r in rows} - {None}
        for kind in new_kinds:
            kinds[kind] = _kind_part(kind)
        for job in new_jobs:
            jobs[job] = _job_part(job)
        return True

    def _plain_page(self, rows: Sequence[Any]) -> bool:
        """True when every row is plain and passes: types, envelope tail, no
        state-moving row, every MAC under the current key."""
        if not self._cache_parts(rows):
            return False
        kinds, jobs = self.kinds, self.jobs
        try:
            if set(map(type, [r[1] for r in rows])) != {int}:
                return False
            tails = [b'%b%b%d,"time_ns":%d}' % (jobs[r[3]], kinds[r[2]], r[0], r[1])
                     for r in rows]
            bodies = [r[4] for r in rows]
            if not all(map(bytes.endswith, bodies, tails)) \
                    or not all(b.startswith(b'{"body":') for b in bodies):
                return False
            macs = [r[7] for r in rows]
            key_ids = [r[8] for r in rows]
            if self.hmac_id is None:
                if macs.count(None) != len(rows) or key_ids.count(None) != len(rows):
                    return False
            elif self.fast_key_id is None or key_ids.count(self.fast_key_id) != len(rows):
                return False
            if rows[0][0] == 0 or any(r[2] in _CAREFUL for r in rows):
                return False
            if self.fast_mac is not None and [self.fast_mac(r[6]) for r in rows] != macs:
                return False
        except (KeyError, TypeError):
            return False
        # one search of the page, not two per row: most pages hold no ingest record
        # (the NUL between bodies is in neither mark, so no match spans two of them)
        mark_journal, mark_spool = _MARKS[0][1], _MARKS[1][1]
        page = b"\0".join(bodies)
        if mark_journal in page or mark_spool in page:
            for i in [i for i, b in enumerate(bodies) if mark_journal in b or mark_spool in b]:
                self._ingested(rows[i][0], bodies[i])
        return True

    def _row_by_row(self, rows: Sequence[Any], *, stop_after_move: bool = False
                    ) -> tuple[int, bool]:
        """`_fast`, one row at a time (it also fills the envelope caches): how many
        leading rows pass, and whether it stopped just after a row that moves state
        (`stop_after_move`)."""
        kinds, jobs = self.kinds, self.jobs
        mark_journal, mark_spool = _MARKS[0][1], _MARKS[1][1]
        fast_key_id, fast_mac = self.fast_key_id, self.fast_mac
        hmac_id = self.hmac_id
        special = self.special
        i = 0
        for seq, time_ns, kind, job_id, body, _prev, h, mac, key_id in rows:
            if type(body) is not bytes or type(h) is not bytes or type(time_ns) is not int:
                break
            kind_part = kinds.get(kind)
            if kind_part is None:
                if type(kind) is not str:
                    break
                if len(kinds) >= CACHE:
                    kinds.clear()
                kind_part = kinds[kind] = _kind_part(kind)
            job_part = jobs.get(job_id)
            if job_part is None:
                if not (job_id is None or type(job_id) is str):
                    break
                if len(jobs) >= CACHE:
                    jobs.clear()
                    jobs[None] = b',"job":null'
                job_part = jobs[job_id] = b',"job":null' if job_id is None \
                    else _job_part(job_id)
            if not body.endswith(b'%b%b%d,"time_ns":%d}' % (job_part, kind_part, seq, time_ns)) \
                    or not body.startswith(b'{"body":'):
                break
            if mark_journal in body or mark_spool in body:
                self._ingested(seq, body)
            if key_id is not None and key_id == fast_key_id and kind not in _CAREFUL \
                    and mac is not None:
                if fast_mac is not None and fast_mac(h) != mac:
                    break
            elif seq == 0 or kind in _CAREFUL or mac is not None \
                    or key_id is not None or hmac_id is not None:
                if not (mac is None or type(mac) is bytes):
                    break
                special.append((seq, kind, body, h, mac, key_id))
                fast_key_id, fast_mac = self._run_key(kind, seq, key_id)
                if stop_after_move:
                    self.fast_key_id, self.fast_mac = fast_key_id, fast_mac
                    return i + 1, True
            i += 1
        self.fast_key_id, self.fast_mac = fast_key_id, fast_mac
        return i, False

    def _ingested(self, seq: int, body: bytes) -> None:
        """A record whose bytes name an ingest source: note it if its body says so."""
        try:
            envelope = json.loads(body)
            source = envelope["body"].get("source")
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not an envelope: the record checks say so
        if source in INGEST_SOURCES:
            self.latest[source] = seq

    def _run_key(self, kind: str, seq: int, key_id: str | None
                 ) -> tuple[str | None, Callable[[bytes], bytes] | None]:
        """After a state-moving row: the key id later plain rows may share, and its MAC."""
        parsed = hmac_epochs.parse_key_id(key_id) if type(key_id) is str else None
        if kind == "key" or parsed is None or not hmac_epochs.reachable(parsed[1], seq):
            return None, None  # an impossible epoch: slow_row names it, no key derived
        if self.keys is None:
            return key_id, None
        mac = self.macs.get(parsed[1])
        if mac is None:
            mac = self.macs[parsed[1]] = hmac_epochs.mac_function(self.keys.key(parsed[1]))
        return key_id, mac

    def _careful(self, row: Sequence[Any]) -> tuple[int, str] | None:
        """Name what is wrong with a row the fast checks refused (documented order),
        or accept it when nothing is (a TEXT column holding the right bytes)."""
        chain = self.chain
        seq = row[0]
        if seq != chain.size:
            return (chain.size, f"record {chain.size} is missing (next stored is {seq})")
        try:
            cast = self.conn.execute(_SELECT_CAST, (seq,)).fetchone()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            return (seq, f"SQLite cannot read the record: {exc}")
        _, time_ns, kind, job_id, body, prev, h, mac, key_id = cast
        if prev != chain.head:
            return (seq, f"prev hash does not match the hash of seq {seq - 1}")
        if not isinstance(body, bytes) or not isinstance(h, bytes) \
                or not isinstance(kind, str) or not isinstance(job_id, str | None):
            return (seq, "a column has the wrong type")
        tail = envelope_tail(kind, job_id).decode()
        if not body.endswith(f'{tail}{seq},"time_ns":{time_ns}}}'.encode()) \
                or not body.startswith(b'{"body":'):
            return (seq, "seq/time/kind/job columns do not match the hashed bytes")
        if chain.accept([cast]) != 1:
            return (seq, "hash does not match prev hash + stored bytes (body or hash edited)")
        if any(mark in body for _, mark in _MARKS):
            self._ingested(seq, body)
        plain = key_id is not None and key_id == self.fast_key_id and kind not in _CAREFUL \
            and mac is not None
        if plain:
            if self.fast_mac is not None and self.fast_mac(h) != mac:
                parsed = hmac_epochs.parse_key_id(key_id)
                epoch = parsed[1] if parsed is not None else "?"
                return (seq, f"MAC does not verify with the epoch {epoch} key")
        elif seq == 0 or kind in _CAREFUL or mac is not None \
                or key_id is not None or self.hmac_id is not None:
            self.special.append((seq, kind, body, h, mac, key_id))
            self.fast_key_id, self.fast_mac = self._run_key(kind, seq, key_id)
        return None


def _lenient(data: bytes) -> str:
    """Invalid UTF-8 as U+FFFD, so the checks fail cleanly (as schema.connect reads)."""
    return data.decode("utf-8", "replace")


def head_before(conn: sqlite3.Connection, lo: int) -> bytes | None:
    """The stored hash of record lo-1 (the genesis' prev for lo = 0)."""
    if lo == 0:
        return GENESIS_PREV
    row = conn.execute("SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?", (lo - 1,)).fetchone()
    return None if row is None or not isinstance(row[0], bytes) else row[0]


def scan_chunk(task: Task) -> Result | None:
    """A worker's chunk: check records [lo, hi) of the file; None when the chunk
    cannot be judged here (the caller then scans in-process)."""
    path, lo, hi, hmac_id, k0, need, anchor = task
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        head = anchor if anchor is not None else head_before(conn, lo)
        if head is None:
            return None
        special: list[Special] = []

        def keep(rows: list[Special]) -> None:
            special.extend(rows)
            if len(special) > MAX_SPECIAL:
                raise Abort("too many records that move verifier state")

        scan = Scan(conn, lo, head, hmac_id=hmac_id, k0=k0, need=need, on_special=keep)
        bad = scan.run(hi)
        chain = scan.chain
        marked = [(size, hashes, h) for size, (hashes, h) in sorted(chain.marked.items())]
        return (bad, special, chain.size, chain.head, chain.hashes, marked,
                scan.subtree_count, scan.subtree_sum, scan.latest)
    except (Abort, sqlite3.Error, UnicodeDecodeError):
        return None
    finally:
        conn.close()


def main() -> None:
    """Script entry: pickled list of tasks in, pickled list of results out."""
    tasks = pickle.load(sys.stdin.buffer)  # noqa: S301 - from the parent verifier
    results: list[Result | None] = []
    held = 0
    for task in tasks:
        result = scan_chunk(task) if held <= MAX_SPECIAL_TOTAL else None
        held += len(result[1]) if result is not None else 0
        results.append(result)
    pickle.dump(results, sys.stdout.buffer)


if __name__ == "__main__":
    main()
