"""The time-series sink on SQLite: our schema under both phase semantics, and bibimbap."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import InputError, KarmanError
from spark_slurm.karman.recorder import (
    BIBIMBAP,
    TABLE,
    PostgresSink,
    SqliteSink,
    bibimbap_data,
    open_sink,
    record,
)
from spark_slurm.karman.schema import TWO_PHASE_PER_STREAM
from tests.unit.karman.cycles import two_stream_cycle

_cycle = two_stream_cycle


def test_streams_are_phases_stores_the_phase_a_readings(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    cycles = [_cycle(i, 100.0 + i, 50.0) for i in range(130)]
    stats = record(iter(cycles), SqliteSink(db), batch=60)
    assert (stats.cycles, stats.rows) == (130, 260)
    con = sqlite3.connect(db)
    rows = con.execute(f"SELECT time_ns, seq, stream, phase, real_power_w, voltage_rms "
                       f"FROM {TABLE} ORDER BY time_ns, stream, phase").fetchall()
    assert rows[:2] == [(1000, 0, "threephase/karman1", "phase_a", 100.0, 120.0),
                        (1000, 0, "threephase/karman2", "phase_a", 100.0, 120.0)]
    # the rack power of each cycle is a plain SUM, never a + b
    rack = con.execute(f"SELECT SUM(real_power_w) FROM {TABLE} GROUP BY time_ns "
                       "ORDER BY time_ns LIMIT 1").fetchone()
    assert rack == (200.0,)
    # A second run appends to the same table.
    record(iter(cycles[:1]), open_sink(str(db)))
    assert con.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (262,)


def test_two_phase_per_stream_stores_both_phases(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    stats = record(iter([_cycle(0, 100.0, 50.0)]), SqliteSink(db), phases=TWO_PHASE_PER_STREAM)
    assert stats.rows == 3
    con = sqlite3.connect(db)
    assert con.execute(f"SELECT SUM(real_power_w) FROM {TABLE}").fetchone() == (250.0,)


def test_bibimbap_rows_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    clock = ManualClock(start_ns=1_700_000_000_123_456_000)
    stats = record(iter([_cycle(0, 100.0, 50.0), _cycle(1, 200.0, 60.0)]),
                   open_sink(str(db), "bibimbap"), clock=clock)
    assert (stats.cycles, stats.rows) == (2, 2)  # one row per message
    con = sqlite3.connect(db)
    rows = con.execute(f"SELECT time, device, data FROM {BIBIMBAP} ORDER BY rowid").fetchall()
    assert rows[0][0] == "2023-11-14T22:13:20.123Z" and rows[0][1] == "bibimbap"
    got = con.execute(f"SELECT json_extract(data, '$.\"threephase/karman1\".phase_a.real_power'),"
                      f" json_extract(data, '$.\"threephase/karman1\".phase_a"
                      f".three_phase_real_power') FROM {BIBIMBAP} ORDER BY rowid").fetchall()
    assert got == [(100.0, 200.0), (200.0, 400.0)]
    data = json.loads(rows[1][2])
    assert set(data["threephase/karman1"]) == {"phase_a", "phase_b"}
    assert set(data["threephase/karman2"]) == {"phase_a"}  # no phase_b was sent


def test_bibimbap_data_has_the_reference_fields_and_sums() -> None:
    data = bibimbap_data(_cycle(3, 100.0, 50.0))
    a = data["threephase/karman1"]["phase_a"]
    assert list(a) == ["rms_current", "rms_voltage", "dc_offset_voltage", "dc_offset_current",
                       "real_power", "apparent_power", "reactive_power", "power_factor",
                       "three_phase_real_power", "three_phase_reactive_power"]
    assert a["three_phase_real_power"] == 200.0  # Σ phase_a over the streams
    assert a["three_phase_reactive_power"] == 20.0
    assert a["dc_offset_voltage"] is None  # never sent: null, not a made-up 0
    b = data["threephase/karman1"]["phase_b"]
    assert b["three_phase_real_power"] == 50.0  # Σ phase_b over the streams that have one


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
    assert sqlite3.connect(db).execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (10,)


def test_unwritable_target_and_bad_schema_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KarmanError, match="cannot record into"):
        SqliteSink(tmp_path / "no" / "such" / "dir.db")
    with pytest.raises(InputError, match="unknown recorder schema 'x'"):
        open_sink(str(tmp_path / "k.db"), "x")


class _FakePg:
    """Records the SQL a sink sends; says whether TimescaleDB is available."""

    def __init__(self, timescale: bool) -> None:
        self.timescale = timescale
        self.sql: list[str] = []

    def execute(self, sql: str) -> _FakePg:
        self.sql.append(" ".join(sql.split()))
        self._last = sql
        return self

    def fetchone(self) -> tuple[int] | None:
        return (1,) if self.timescale and "pg_available_extensions" in self._last else None


@pytest.mark.parametrize("timescale", [True, False])
def test_bibimbap_becomes_a_hypertable_only_with_timescaledb(timescale: bool) -> None:
    # Debian has no TimescaleDB to run, so the hypertable branch is checked on the SQL
    # it sends: the reference init script's hypertable, partitioned by device into 4.
    sink = PostgresSink.__new__(PostgresSink)
    sink.schema = "bibimbap"
    fake = _FakePg(timescale)
    sink.db = fake  # type: ignore[assignment]  # a stand-in connection
    assert sink._create_table() is timescale
    assert fake.sql[0] == ("CREATE TABLE IF NOT EXISTS bibimbap (time TIMESTAMPTZ NOT NULL, "
                           "device TEXT NOT NULL, data JSONB NOT NULL)")
    hyper = [s for s in fake.sql if "create_hypertable" in s]
    if timescale:
        assert "CREATE EXTENSION IF NOT EXISTS timescaledb" in fake.sql
        assert hyper == ["SELECT create_hypertable('bibimbap', 'time', partitioning_column => "
                         "'device', number_partitions => 4, if_not_exists => TRUE)"]
    else:
        assert not hyper and not any("EXTENSION" in s for s in fake.sql)
    assert "CREATE INDEX IF NOT EXISTS bibimbap_time_idx ON bibimbap (time DESC)" in fake.sql
