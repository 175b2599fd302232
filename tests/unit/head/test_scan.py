"""Merge's per-row check takes and refuses exactly the rows `sparkctl verify`'s chain
does: both decide the link with `chain.continues`, so a row that does not continue
the chain is refused by each, fast path and full checks alike, at the same seq."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.head.scan import ChainScan, RawRecord, genesis_body, identify
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.chain import Chain
from tests.unit.head import tamper


class NoLookups:
    """A source with nothing else to look up (no earlier copy of any hash)."""

    def hash_at(self, seq: int) -> bytes | None:
        return None

    def seq_of_hash(self, value: bytes) -> int | None:
        return None


@pytest.fixture
def records(tmp_path: Path) -> list[RawRecord]:
    clock = ManualClock()
    path = tmp_path / "n1.db"
    with Ledger.open(path, node="n1", cluster="c1", clock=clock) as led:
        for i in range(12):
            led.append("cap", {"v": 1, "node": "n1", "job_id": "7", "power_mw": 1000 + i})
            clock.advance(1)
    return [RawRecord._make(r) for r in tamper.rows(path)]


def _edit(recs: list[RawRecord], seq: int, **cols: Any) -> list[RawRecord]:
    out = list(recs)
    out[seq] = out[seq]._replace(**cols)
    return out


def _taken(recs: list[RawRecord]) -> tuple[int, int, int, list[tuple[str, int | None]]]:
    """(Chain.accept, ChainScan fast, ChainScan full): rows taken; the full findings."""
    chain = Chain()
    taken = [chain.accept(recs)]
    findings: list[tuple[str, int | None]] = []
    for fast in (True, False):
        ident, problem, _ = identify(genesis_body(recs[0]), None, None, "n1")
        assert ident is not None and problem is None
        scan = ChainScan(ident, NoLookups(), fast=fast)
        taken.append(scan.feed(recs))
        findings = [(f.code, f.seq) for f in scan.findings]
    return taken[0], taken[1], taken[2], findings


def test_an_untouched_ledger_is_taken_whole(records: list[RawRecord]) -> None:
    assert _taken(records) == (len(records), len(records), len(records), [])


def test_a_prev_hash_column_edited_alone_is_refused_by_both(records: list[RawRecord]) -> None:
    """Record 5's hash still covers the true link; only its prev column lies."""
    assert _taken(_edit(records, 5, prev_hash=bytes(32))) == (5, 5, 5, [("TAMPERED", 5)])


def test_a_row_after_a_rewritten_record_is_refused_by_both(records: list[RawRecord]) -> None:
    """Record 4 rewritten with a hash right for its own bytes: record 5 still links to
    the old hash (the mutation that survived when the link check was removed)."""
    body = records[4].body.replace(b'"power_mw":', b'"power_mw":9', 1)
    forged = _edit(records, 4, body=body,
                   hash=hashlib.sha256(records[4].prev_hash + body).digest())
    assert _taken(forged) == (5, 5, 5, [("TAMPERED", 5)])


def test_a_rewrite_relinked_onward_is_taken_by_both(records: list[RawRecord]) -> None:
    """Self-consistent from record 4 on: no link rule can see it (checkpoints and the
    held chain do, tests/unit/head/test_rewrite_derived.py)."""
    out, prev = list(records[:4]), records[3].hash
    for rec in records[4:]:
        body = rec.body.replace(b'"power_mw":', b'"power_mw":9', 1) if rec.seq == 4 \
            else rec.body
        h = hashlib.sha256(prev + body).digest()
        out.append(rec._replace(body=body, prev_hash=prev, hash=h))
        prev = h
    assert _taken(out) == (len(out), len(out), len(out), [])
