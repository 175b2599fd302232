"""`ledger export`: a segment holds the rows after a seq and the checkpoints covering them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import LedgerError
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.segment import SEGMENT_FORMAT, export_segment
from tests.unit.ledger.conftest import Keys


@pytest.fixture
def ledger(tmp_path: Path, keys: Keys) -> Ledger:
    return Ledger.open(tmp_path / "node.db", keys.hmac, keys.signing, node="n1",
                       cluster="c1", clock=ManualClock())


def _table(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_rows_after_the_cut_and_the_checkpoints_covering_them(
        ledger: Ledger, tmp_path: Path) -> None:
    led = ledger
    for i in range(30):
        led.append("cap", {"job_id": str(i)})
        if i in (9, 19):
            led.checkpoint()
    led.close()
    out = tmp_path / "seg.db"
    seg = export_segment(Path(led.path), out, 14)
    source = _table(Path(led.path), "SELECT * FROM per WHERE seq > 14 ORDER BY seq")
    assert _table(out, "SELECT * FROM per ORDER BY seq") == source
    assert seg.rows == len(source) and seg.size == 31 and seg.after == 14
    sizes = [int(str(r[0])) for r in _table(out, "SELECT size FROM checkpoint ORDER BY id")]
    assert sizes and min(sizes) > 15 and seg.checkpoints == len(sizes)
    meta = {str(k): str(v) for k, v in _table(out, "SELECT key, value FROM meta")}
    assert meta["format"] == SEGMENT_FORMAT and meta["after"] == "14"
    assert meta["node"] == "n1" and meta["size"] == "31"


def test_export_reads_a_live_ledger_without_disturbing_it(
        ledger: Ledger, tmp_path: Path) -> None:
    led = ledger
    led.append_many([("cap", {"job_id": str(i)}) for i in range(20)])
    seg = export_segment(Path(led.path), tmp_path / "live.seg", -1)
    assert seg.rows == led.size  # frames still in the writer's WAL are included
    led.append("cap", {"job_id": "after"})  # the writer carries on
    assert led.size == seg.rows + 1
    led.close()


def test_nothing_new_and_a_cut_past_the_end(ledger: Ledger, tmp_path: Path) -> None:
    led = ledger
    led.append("cap", {"job_id": "1"})
    led.close()
    seg = export_segment(Path(led.path), tmp_path / "a.seg", 1)
    assert (seg.rows, seg.size) == (0, 2)
    seg = export_segment(Path(led.path), tmp_path / "b.seg", 50)  # the head holds more: it says so
    assert (seg.rows, seg.size) == (0, 2)


def test_bad_input_is_a_clear_error_and_writes_nothing(ledger: Ledger,
                                                        tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("x")
    with pytest.raises(LedgerError, match="not a ledger"):
        export_segment(junk, tmp_path / "out.seg", -1)
    with pytest.raises(LedgerError, match="-1"):
        export_segment(junk, tmp_path / "out.seg", -3)
    assert list(tmp_path.glob("*.seg")) == [] and list(tmp_path.glob(".segment-*")) == []
    led = ledger
    led.close()
    with pytest.raises(LedgerError, match="cannot write"):
        export_segment(Path(led.path), tmp_path / "missing" / "out.seg", -1)


def test_archived_ranges_chain_and_verify_by_merging_in_order(
        ledger: Ledger, keys: Keys, tmp_path: Path) -> None:
    """Node-ledger archives: consecutive ranges, checked end to end by a scratch merge."""
    from spark_slurm.head.merge import merge_ledgers  # noqa: PLC0415

    led = ledger
    for i in range(60):
        led.append("cap", {"v": 1, "node": "n1", "job_id": str(i)})
        if i % 20 == 19:
            led.checkpoint()
    led.close()
    cuts = [(-1, 19), (19, 40), (40, None)]
    parts = [export_segment(Path(led.path), tmp_path / f"part{i}.seg", a, u)
             for i, (a, u) in enumerate(cuts)]
    assert [p.rows for p in parts] == [20, 21, led.size - 41]
    summary = merge_ledgers(tmp_path / "scratch.db", [p.path for p in parts])
    assert summary.ok and summary.appended == led.size
    out_of_order = merge_ledgers(tmp_path / "other.db", [parts[1].path, parts[0].path])
    assert [f.code for f in out_of_order.findings] == ["GAP"]
