"""Ways to damage a node ledger file the way an attacker or an accident would."""

from __future__ import annotations

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


def rewrite(path: Path, new_rows: list[list[Any]], k0: bytes | None) -> None:
    """Replace every row with a freshly chained (and, with K[0], re-MACed) version:
    what an attacker holding the key could do. Envelopes are rebuilt for the new seq."""
    prev = GENESIS_PREV
    out = []
    keys = hmac_epochs.EpochKeys(k0) if k0 is not None else None
    for seq, r in enumerate(new_rows):
        body = json.loads(r[4])["body"]
        stored = envelope_bytes(seq, r[1], r[2], body)
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
    conn.close()
