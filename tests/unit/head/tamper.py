"""Ways to damage a node ledger file the way an attacker or an accident would."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.chain import GENESIS_PREV, link_hash
from spark_slurm.ledger.records import envelope_bytes


def sql(path: Path, statement: str, args: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(statement, args)
    conn.close()


def rows(path: Path) -> list[list[Any]]:
    conn = sqlite3.connect(path)
    out = [list(r) for r in conn.execute(
        "SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac, key_id FROM per "
        "ORDER BY seq")]
    conn.close()
    return out


def rewrite(path: Path, new_rows: list[list[Any]], k0: bytes | None, *,
            tree: bool = False, raw: frozenset[int] = frozenset()) -> None:
    """Replace every row with a freshly chained (and, with K[0], re-MACed) version:
    what an attacker holding the key could do. Envelopes are rebuilt for the new seq
    (the rows at `raw` seqs keep their stored bytes as given, JSON or not); with
    `tree`, the saved frontier and subtrees too (checkpoints are always dropped)."""
    prev = GENESIS_PREV
    out = []
    keys = hmac_epochs.EpochKeys(k0) if k0 is not None else None
    for seq, r in enumerate(new_rows):
        stored = bytes(r[4]) if seq in raw \
            else envelope_bytes(seq, r[1], r[2], json.loads(r[4])["body"])
        h = link_hash(prev, stored)
        mac = r[7]
        if keys is not None and r[8]:
            parsed = hmac_epochs.parse_key_id(r[8])
            assert parsed is not None
            mac = hmac_epochs.mac(keys.key(parsed[1]), h)
        out.append((seq, r[1], r[2], r[3], stored, prev, h, mac, r[8]))
        prev = h
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM per")
        conn.executemany("INSERT INTO per (seq, time_ns, kind, job_id, body, prev_hash, hash, "
                         "mac, key_id) VALUES (?,?,?,?,?,?,?,?,?)", out)
        conn.execute("DELETE FROM checkpoint")
        if tree:
            fix_tree(conn, [r[4] for r in out])
    conn.close()


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 tree head, recursively as the RFC writes it (not the library's Chain)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def fix_tree(conn: sqlite3.Connection, bodies: list[bytes]) -> None:
    """Rewrite the saved Merkle frontier and the stored 256-leaf subtrees for these
    record bodies, as a thorough attacker would."""
    leaves = [hashlib.sha256(b"\x00" + b).digest() for b in bodies]
    frontier, at = b"", 0
    for k in range(len(leaves).bit_length() - 1, -1, -1):
        if len(leaves) >> k & 1:
            frontier += _mth(leaves[at:at + (1 << k)])
            at += 1 << k
    conn.execute("UPDATE state SET value = ? WHERE key = 'frontier'", (frontier,))
    conn.execute("DELETE FROM tree")
    level = 8
    while 1 << level <= len(leaves):
        for idx in range(len(leaves) >> level):
            conn.execute("INSERT INTO tree VALUES (?, ?, ?)",
                         (level, idx, _mth(leaves[idx << level:(idx + 1) << level])))
        level += 1


def rewrite_derived(path: Path, seq: int, *, relink: bool, k0: bytes | None = None,
                    drop_checkpoints: bool = False) -> None:
    """What someone with write access but no signing key does to a node ledger: edit
    record `seq`'s body ("power_mw":N becomes "power_mw":9N) and recompute its hash,
    then (relink) every later record's prev hash and hash, with K[0] every MAC made
    over a changed hash, and always the saved frontier and the stored subtrees. No
    checkpoint is re-signed (`drop_checkpoints` deletes them instead). Written with
    hashlib and hmac alone, so it shares no code with what it attacks."""
    conn = sqlite3.connect(path)
    rows = [(int(s), bytes(b), bytes(p), bytes(h), k) for s, b, p, h, k in conn.execute(
        "SELECT seq, body, prev_hash, hash, key_id FROM per ORDER BY seq")]
    body = rows[seq][1].replace(b'"power_mw":', b'"power_mw":9', 1)
    assert body != rows[seq][1], f"record {seq} has no power_mw to edit"
    prev = rows[seq][2]
    for s in range(seq, len(rows) if relink else seq + 1):
        data = body if s == seq else rows[s][1]
        h = hashlib.sha256(prev + data).digest()
        mac = None
        if k0 is not None:
            epoch = int(str(rows[s][4]).rsplit(":", 1)[1])
            key = k0
            for _ in range(epoch):  # K[e+1] = HMAC-SHA256(K[e], label), docs/ledger-format.md
                key = hmac.digest(key, hmac_epochs.EPOCH_LABEL, "sha256")
            mac = hmac.digest(key, h, "sha256")
        conn.execute("UPDATE per SET body = ?, prev_hash = ?, hash = ?, mac = ? WHERE seq = ?",
                     (data, prev, h, mac, s))
        rows[s] = (s, data, prev, h, rows[s][4])
        prev = h
    fix_tree(conn, [r[1] for r in rows])
    if drop_checkpoints:
        conn.execute("DELETE FROM checkpoint")
    conn.commit()
    conn.close()
