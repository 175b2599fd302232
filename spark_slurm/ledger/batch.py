"""The append hot loop: encode a batch of PERs, link them onto the chain, MAC them.

Kept apart from the store so the per-record encoding is one tight loop over
locals (envelope tail cached per (kind, job)); the chain hash and the Merkle
tree are `Chain.link`'s, the one implementation verify and merge use too. It
yields exactly the bytes and errors, in the same order, that
`records.envelope_bytes` + `chain.link_hash` would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.chain import Chain
from spark_slurm.ledger.records import body_bytes, check_kind, envelope_suffix, job_of
from spark_slurm.ledger.schema import INGEST_SOURCES

Row = tuple[int, int, str, str | None, bytes, bytes, bytes, bytes | None, str | None]
"""A `per` table row in INSERT_PER column order."""


def chain_rows(batch: Sequence[tuple[str, Mapping[str, Any]]], rows: list[Row], *, now: int,
               chain: Chain, key: bytes | None, key_id: str | None,
               latest: dict[str, int] | None = None) -> None:
    """Append one row per (kind, body) to `rows`, linked onto `chain` (which moves
    past them). Every body is encoded before the chain moves, so a body that
    cannot be stored raises with the chain and `rows` untouched. `latest`, when
    given, gets the seq of the last record from each ingest source."""
    mac_of = None if key is None else hmac_epochs.mac_function(key)
    tails: dict[tuple[str, str | None], bytes] = {}
    time_tail = f',"time_ns":{now}}}'.encode()
    seq = chain.size
    encoded: list[tuple[str, str | None, bytes]] = []
    for kind, body in batch:
        job = job_of(body)
        tail = tails.get((kind, job)) if type(kind) is str else None
        if tail is None:
            tail = envelope_suffix(0, now, check_kind(kind), job)
            tail = tail[:tail.rindex(b'"seq":') + 6]
            tails[(kind, job)] = tail
        encoded.append((kind, job, b"".join((b'{"body":', body_bytes(body), tail,
                                             str(seq).encode(), time_tail))))
        if latest is not None and (source := body.get("source")) in INGEST_SOURCES:
            latest[source] = seq
        seq += 1
    prev = chain.head
    seq = chain.size
    hashes = chain.link([stored for _, _, stored in encoded])
    append = rows.append
    for (kind, job, stored), h in zip(encoded, hashes, strict=True):
        append((seq, now, kind, job, stored, prev, h, None if mac_of is None else mac_of(h),
                key_id))
        prev = h
        seq += 1
