"""Worker side of the parallel verifier: check a seq chunk of a ledger file.

Stdlib only, and runnable as a script (`python -E -s -S scan_worker.py`: pickled
tasks on stdin, pickled results on stdout) so verify_par starts clean worker
processes in milliseconds without forking a process that holds SQLite
connections and without re-importing the caller's __main__ (multiprocessing
would). The checks are those of verify_walk.walk, row for row.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__:
    from spark_slurm.ledger import hmac_epochs
else:  # run as a script: the sibling module, without the package's imports
    import hmac_epochs  # type: ignore[import-not-found,no-redef]

GENESIS_PREV = bytes(32)
MMAP_BYTES = 1 << 32
# as records._PLAIN: strings made of these need no JSON escaping
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+[],")

Task = tuple[str, int, int, str | None, bytes | None, tuple[int, ...]]
"""(path, lo, hi, hmac id, K[0] or None, tree sizes in (lo, hi] to report)."""
Result = tuple[bool, list[tuple[Any, ...]], list[bytes], list[tuple[int, list[bytes], bytes]],
               bytes]
"""(ok, rows that move state, local frontier hashes, [(size, hashes, head)], head)."""
_SELECT = ("SELECT seq, time_ns, kind, job_id, CAST(body AS BLOB), CAST(prev_hash AS BLOB), "
           "CAST(hash AS BLOB), CAST(mac AS BLOB), key_id FROM per "
           "WHERE seq >= ? AND seq < ? ORDER BY seq")
_FAILED: Result = (False, [], [], [], b"")


def _json_str(value: str) -> str:
    return f'"{value}"' if set(value) <= _PLAIN else json.dumps(value, ensure_ascii=False)


def envelope_tail(kind: str, job_id: str | None) -> str:
    """records.envelope_suffix up to and including '"seq":'."""
    job = "null" if job_id is None else _json_str(job_id)
    return f',"job":{job},"kind":{_json_str(kind)},"seq":'


def scan_chunk(task: Task) -> Result:
    """Check records [lo, hi); never raises (a failure is ok=False)."""
    try:
        return _scan(task)
    except Exception:
        return _FAILED


def _scan(task: Task) -> Result:
    path, lo, hi, hmac_id, k0, need = task
    sha256 = hashlib.sha256
    keys = hmac_epochs.EpochKeys(k0) if k0 is not None else None
    macs: dict[int, Callable[[bytes], bytes]] = {}  # epoch -> MAC with its key fixed
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                           isolation_level=None)
    try:
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")  # read pages without copying
        head = GENESIS_PREV
        if lo:
            row = conn.execute("SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?",
                               (lo - 1,)).fetchone()
            head = row[0]
        cur = conn.execute(_SELECT, (lo, hi))
        special: list[tuple[Any, ...]] = []
        fh: list[bytes] = []
        at_need: list[tuple[int, list[bytes], bytes]] = []
        suffixes: dict[tuple[str, str | None], str] = {}
        fast_key_id: str | None = None
        fast_mac: Callable[[bytes], bytes] | None = None
        expect = lo
        while rows := cur.fetchmany(4096):
            for seq, time_ns, kind, job_id, body, prev, h, mac, key_id in rows:
                if seq != expect or prev != head or type(body) is not bytes \
                        or type(h) is not bytes or type(kind) is not str \
                        or not (job_id is None or type(job_id) is str):
                    return _FAILED
                tail = suffixes.get((kind, job_id))
                if tail is None:
                    tail = envelope_tail(kind, job_id)
                    suffixes[(kind, job_id)] = tail
                if not body.endswith(f'{tail}{seq},"time_ns":{time_ns}}}'.encode()) \
                        or not body.startswith(b'{"body":') \
                        or sha256(prev + body).digest() != h:
                    return _FAILED
                head = h
                if key_id is not None and key_id == fast_key_id and kind != "key" \
                        and mac is not None:
                    if fast_mac is not None and fast_mac(h) != mac:
                        return _FAILED
                elif seq == 0 or kind in ("key", "genesis") or mac is not None \
                        or key_id is not None or hmac_id is not None:
                    special.append((seq, kind, body, h, mac, key_id))
                    parsed = hmac_epochs.parse_key_id(key_id) if type(key_id) is str else None
                    if parsed is not None and not hmac_epochs.reachable(parsed[1], seq):
                        return _FAILED  # the reference walk names the impossible epoch
                    fast_key_id = key_id if kind != "key" and parsed is not None else None
                    fast_mac = None
                    if keys is not None and parsed is not None:
                        fast_mac = macs.get(parsed[1])
                        if fast_mac is None:
                            fast_mac = macs[parsed[1]] = hmac_epochs.mac_function(
                                keys.key(parsed[1]))
                leaf = sha256(b"\x00" + body).digest()
                n = seq - lo
                while n & 1:
                    leaf = sha256(b"\x01" + fh.pop() + leaf).digest()
                    n >>= 1
                fh.append(leaf)
                expect = seq + 1
                if expect in need:
                    at_need.append((expect, list(fh), h))
        if expect != hi:
            return _FAILED
        return (True, special, fh, at_need, head)
    finally:
        conn.close()


def main() -> None:
    """Script entry: pickled list of tasks in, pickled list of results out."""
    tasks = pickle.load(sys.stdin.buffer)  # noqa: S301 - from the parent verifier
    pickle.dump([scan_chunk(t) for t in tasks], sys.stdout.buffer)


if __name__ == "__main__":
    main()
