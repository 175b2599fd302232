"""The append hot loop gives exactly the rows the reference functions give."""

from __future__ import annotations

import hmac
from typing import Any

import pytest

from spark_slurm.errors import CanonicalError
from spark_slurm.ledger import hmac_epochs as he
from spark_slurm.ledger.batch import Row, chain_rows
from spark_slurm.ledger.chain import GENESIS_PREV, Chain, link_hash
from spark_slurm.ledger.merkle import Frontier, leaf_hash
from spark_slurm.ledger.records import envelope_bytes, job_of

BATCH: list[tuple[str, Any]] = [
    ("cap", {"v": 1, "job_id": "7", "gpus": [{"index": 0, "ok": True, "x": None}]}),
    ("cap", {"v": 1, "job_id": "7"}),
    ("restore", {"job_id": 'we"ird\\ job ü\n'}),
    ("key", {"event": "seal", "epoch": 3}),
    ("cap", {"tuple": (1, 2), "big": 10**30}),  # not plain: the careful path
    ("cap", {"deep": [[[{"a": []}]]], "t": "température"}),
]


@pytest.mark.parametrize("key", [None, bytes(range(32))])
@pytest.mark.parametrize("start", [0, 1, 5, 8])
def test_chain_rows_matches_the_reference(key: bytes | None, start: int) -> None:
    base = Frontier()
    for i in range(start):
        base.append(leaf_hash(b"%d" % i))
    head = b"\x07" * 32 if start else GENESIS_PREV
    rows: list[Row] = []
    chain = Chain(start, base.hashes, head)
    chain_rows(BATCH * 3, rows, now=123, chain=chain, key=key,
               key_id=None if key is None else "k:0")
    ref = Frontier(base.size, base.hashes)
    prev = head
    for i, ((kind, body), row) in enumerate(zip(BATCH * 3, rows, strict=True)):
        stored = envelope_bytes(start + i, 123, kind, body)
        h = link_hash(prev, stored)
        mac = None if key is None else hmac.digest(key, h, "sha256")
        assert row == (start + i, 123, kind, job_of(body), stored, prev, h, mac,
                       None if key is None else "k:0")
        ref.append(leaf_hash(stored))
        prev = h
    assert chain.hashes == ref.hashes
    assert (chain.size, chain.head) == (start + len(rows), prev)


@pytest.mark.parametrize(("item", "error"), [
    (("cap", {"x": 1.5}), "float"),
    ((["not", "hashable"], {"x": 1}), "kind"),
    (("Bad Kind", {"x": 1}), "kind"),
    (("cap", {"job_id": 5}), "job_id"),
])
def test_a_refused_record_leaves_the_chain_and_rows_untouched(item: tuple[Any, Any],
                                                             error: str) -> None:
    rows: list[Row] = []
    chain = Chain()
    chain.link([b"genesis"])
    before = (chain.size, chain.head, list(chain.hashes))
    with pytest.raises(CanonicalError, match=error):
        chain_rows([("cap", {"a": 1}), item], rows, now=1, chain=chain, key=None, key_id=None)
    assert rows == []
    assert (chain.size, chain.head, chain.hashes) == before


@pytest.mark.parametrize("key", [b"", b"k", bytes(32), bytes(range(64)), bytes(range(65)),
                                 bytes(100)])
def test_fixed_key_mac_is_hmac_sha256(key: bytes) -> None:
    fixed = he.mac_function(key)
    for msg in (b"", b"x" * 32, bytes(range(200))):
        assert fixed(msg) == hmac.digest(key, msg, "sha256") == he.mac(key, msg)
        assert fixed(msg) == fixed(msg)  # the prepared states are copied, never consumed
