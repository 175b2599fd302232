"""`ledger export`: a segment holds the rows after a seq and the checkpoints covering them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.clock import ManualClock
from spark_slurm.errors import LedgerError
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.merkle import verify_consistency
from spark_slurm.ledger.segment import SEGMENT_FORMAT, export_segment, read_witness_part
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


def _grown(led: Ledger, count: int, *, every: int = 0) -> list[int]:
    sizes = []
    for i in range(count):
        led.append("cap", {"v": 1, "node": "n1", "job_id": str(i)})
        if every and i % every == every - 1:
            sizes.append(led.checkpoint().size)
    return sizes


def test_the_witness_part_proves_the_newest_checkpoint_from_the_witnessed_one(
        ledger: Ledger, tmp_path: Path) -> None:
    led = ledger
    _grown(led, 700, every=300)                       # checkpoints at ~300 and ~600
    witnessed = led.checkpoints()[0]
    led.rotate_signing_key(Ed25519PrivateKey.generate())
    _grown(led, 40)
    newest = led.checkpoint()
    led.close()
    seg = export_segment(Path(led.path), tmp_path / "n1.seg", 650, proof_from=witnessed.size)
    assert (seg.newest, seg.proof_from) == (newest.size, witnessed.size)
    part = read_witness_part(tmp_path / "n1.seg")
    assert part.checkpoint == newest.text
    assert (part.proof_from, part.proof_to) == (witnessed.size, newest.size)
    assert verify_consistency(witnessed.size, newest.size, witnessed.root, newest.root,
                              part.proof)
    assert len(part.proof) <= 2 * newest.size.bit_length()
    keyed = _table(Path(led.path), "SELECT seq, CAST(body AS BLOB) FROM per WHERE kind = 'key'")
    rotations = [(seq, body) for seq, body in keyed
                 if isinstance(body, bytes) and json.loads(body)["body"].get("event") == "rotate"]
    assert part.rotations == rotations and seg.rotations == len(rotations) == 1
    assert _table(tmp_path / "n1.seg", "SELECT seq, kind FROM genesis") == [(0, "genesis")]


def test_the_newest_checkpoint_rides_along_even_when_it_covers_nothing_new(
        ledger: Ledger, tmp_path: Path) -> None:
    """A node rolled back below the head's position still shows how small it is."""
    led = ledger
    _grown(led, 30, every=10)
    newest = led.checkpoints()[-1]
    led.close()
    seg = export_segment(Path(led.path), tmp_path / "a.seg", 80, proof_from=45)
    assert (seg.rows, seg.size, seg.checkpoints, seg.newest) == (0, 31, 1, newest.size)
    part = read_witness_part(tmp_path / "a.seg")
    assert part.checkpoint == newest.text
    assert (part.proof_from, part.proof) == (None, [])  # smaller than the witness's: no proof
    meta = {str(k): str(v) for k, v in _table(tmp_path / "a.seg", "SELECT key, value FROM meta")}
    assert "proof_from" not in meta and meta["newest_checkpoint"] == str(newest.size)
    with pytest.raises(LedgerError, match="--proof-from -2"):
        export_segment(Path(led.path), tmp_path / "b.seg", 3, proof_from=-2)


def test_a_segment_without_the_witness_tables_carries_no_proof(
        ledger: Ledger, tmp_path: Path) -> None:
    led = ledger
    _grown(led, 20, every=10)
    led.close()
    export_segment(Path(led.path), tmp_path / "old.seg", 5, proof_from=10)
    conn = sqlite3.connect(tmp_path / "old.seg")
    for table in ("proof", "rotation", "genesis"):
        conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    part = read_witness_part(tmp_path / "old.seg")
    assert part.checkpoint is not None and part.proof_from is None and part.rotations is None
    with pytest.raises(LedgerError, match="not a segment"):
        read_witness_part(Path(led.path))


def test_cli_export_carries_the_proof(ledger: Ledger, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from spark_slurm.cli import run  # noqa: PLC0415

    led = ledger
    _grown(led, 40, every=20)
    *_, first, newest = led.checkpoints()
    led.close()
    out = tmp_path / "c.seg"
    assert run(["ledger", "export", str(led.path), "--after", "25", "--proof-from",
                str(first.size), "--out", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["proof_from"], shown["newest_checkpoint"]) == (first.size, newest.size)
    part = read_witness_part(out)
    assert verify_consistency(first.size, newest.size, first.root, newest.root, part.proof)
