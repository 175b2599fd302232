"""The append hot loop: encode, chain-hash, MAC and Merkle-append a batch of PERs.

Kept apart from the store so the per-record work is one tight loop over locals
(envelope tail cached per (kind, job), the frontier inlined) rather than a few
method calls per record; it yields exactly the bytes and errors, in the same
order, that `records.envelope_bytes` + `record_hash` + `Frontier.append` would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.records import body_bytes, check_kind, envelope_suffix, job_of

Row = tuple[int, int, str, str | None, bytes, bytes, bytes, bytes | None, str | None]
"""A `per` table row in INSERT_PER column order."""


def chain_rows(batch: Sequence[tuple[str, Mapping[str, Any]]], rows: list[Row], *, now: int,
               seq: int, head: bytes, hashes: list[bytes], key: bytes | None,
               key_id: str | None) -> None:
    """Append one row per (kind, body) to `rows`, starting at `seq` after `head`;
    `hashes` (a Merkle frontier of size `seq`) is extended in place. On error the
    rows made so far stay in `rows` and `hashes` covers exactly them."""
    sha256 = hashlib.sha256
    mac_of = None if key is None else hmac_epochs.mac_function(key)
    tails: dict[tuple[str, str | None], bytes] = {}
    time_tail = f',"time_ns":{now}}}'.encode()
    append = rows.append
    for kind, body in batch:
        job = job_of(body)
        tail = tails.get((kind, job)) if type(kind) is str else None
        if tail is None:
            tail = envelope_suffix(0, now, check_kind(kind), job)
            tail = tail[:tail.rindex(b'"seq":') + 6]
            tails[(kind, job)] = tail
        stored = b"".join((b'{"body":', body_bytes(body), tail, str(seq).encode(), time_tail))
        h = sha256(head + stored).digest()
        mac = None if mac_of is None else mac_of(h)
        leaf = sha256(b"\x00" + stored).digest()
        n = seq
        while n & 1:
            leaf = sha256(b"\x01" + hashes.pop() + leaf).digest()
            n >>= 1
        hashes.append(leaf)
        append((seq, now, kind, job, stored, head, h, mac, key_id))
        head = h
        seq += 1
