"""SQLite time-series sink and the exporter's last-second statistics."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from spark_slurm.errors import KarmanError
from spark_slurm.karman.exporter import second_stats
from spark_slurm.karman.recorder import TABLE, SqliteSink, open_sink, record
from spark_slurm.karman.schema import Cycle, PhaseReading, StreamReading


def _cycle(i: int, a_w: float, b_w: float | None) -> Cycle:
    a = PhaseReading(real_power_w=a_w, voltage_rms=120.0 + i, current_rms=a_w / 120,
                     power_factor=0.98)
    b = None if b_w is None else PhaseReading(real_power_w=b_w, voltage_rms=121.0)
    return Cycle(1_000 + i, i, (StreamReading("k1", a, b), StreamReading("k2", a, None)))


def test_every_cycle_lands_in_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    cycles = [_cycle(i, 100.0 + i, 50.0) for i in range(130)]
    stats = record(iter(cycles), SqliteSink(db), batch=60)
    assert (stats.cycles, stats.rows) == (130, 390)
    con = sqlite3.connect(db)
    rows = con.execute(f"SELECT time_ns, seq, stream, phase, real_power_w, voltage_rms "
                       f"FROM {TABLE} ORDER BY time_ns, stream, phase").fetchall()
    assert len(rows) == 390
    assert rows[:3] == [(1000, 0, "k1", "phase_a", 100.0, 120.0),
                        (1000, 0, "k1", "phase_b", 50.0, 121.0),
                        (1000, 0, "k2", "phase_a", 100.0, 120.0)]
    # A second run appends to the same table.
    record(iter(cycles[:1]), open_sink(str(db)))
    assert con.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (393,)


def test_stop_flushes_pending_rows(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    stop = threading.Event()

    def gen() -> object:
        for i in range(10):
            if i == 4:
                stop.set()
            yield _cycle(i, 1.0, 1.0)

    stats = record(gen(), SqliteSink(db), batch=1000, stop=stop)  # type: ignore[arg-type]
    assert stats.cycles == 5
    assert sqlite3.connect(db).execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (15,)


def test_unwritable_target_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KarmanError, match="cannot record into"):
        SqliteSink(tmp_path / "no" / "such" / "dir.db")


def test_second_stats_per_phase_stream_and_rack() -> None:
    cycles = [_cycle(0, 100.0, 50.0), _cycle(1, 300.0, 10.0), _cycle(2, 200.0, None)]
    stats = second_stats(cycles)
    assert stats[("real_power_w", "k1", "phase_a")] == {
        "latest": 200.0, "peak": 300.0, "trough": 100.0, "average": 200.0}
    assert stats[("real_power_w", "k1", "phase_b")]["average"] == 30.0
    assert stats[("real_power_w", "k1", "sum")] == {
        "latest": 200.0, "peak": 310.0, "trough": 150.0, "average": 220.0}
    assert stats[("real_power_w", "rack", "sum")]["peak"] == 610.0
    assert stats[("voltage_rms", "k2", "phase_a")]["latest"] == 122.0
    assert ("voltage_rms", "k1", "sum") not in stats  # voltages do not add up
    assert ("apparent_power_va", "k1", "phase_a") not in stats  # never sent
