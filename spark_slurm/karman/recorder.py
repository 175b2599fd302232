"""Time-series sink for a Karman stream, in our schema or the reference `bibimbap` one.

Two schemas, each on SQLite (a file path) or PostgreSQL (a `postgresql://` URL):

- `karman` (ours): table `karman_readings`, one row per stream × counted phase per
  cycle (`karman.phases`: with `streams-are-phases` phase_b is the replay's copy
  of phase_a and is not stored, so `SUM(real_power_w) GROUP BY time` is the rack
  power either way), time from the cycle's own `utc_time`.
- `bibimbap` (the reference `data-db` sink): table
  `bibimbap(time timestamptz, device text, data jsonb)`, one row per message,
  `device` = 'bibimbap', `time` the time we received it, and `data` =
  {calculation_name: {phase_a: {...}, phase_b: {...}}} with every quantity and the
  three-phase sums (over streams, of the same phase) the reference dashboards read.

On PostgreSQL the table becomes a TimescaleDB hypertable when the extension is
available (bibimbap: on `time`, partitioned by `device` into 4, as the
reference's init script does) and stays a plain table otherwise. Rows are
committed in batches (every `batch` cycles and at the end), so a stop loses
nothing already received.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import InputError, KarmanError
from spark_slurm.karman.schema import DEFAULT_PHASES, DEFAULT_TOPIC, Cycle, check_phases

TABLE = "karman_readings"
BIBIMBAP = "bibimbap"
SCHEMAS = ("karman", BIBIMBAP)
ROW_FIELDS = ("real_power_w", "apparent_power_va", "reactive_power_var", "power_factor",
              "voltage_rms", "voltage_dc_offset", "current_rms", "current_dc_offset")
# bibimbap data keys, in the reference sink's order -> PhaseReading field
BIBIMBAP_FIELDS = (("rms_current", "current_rms"), ("rms_voltage", "voltage_rms"),
                   ("dc_offset_voltage", "voltage_dc_offset"),
                   ("dc_offset_current", "current_dc_offset"), ("real_power", "real_power_w"),
                   ("apparent_power", "apparent_power_va"),
                   ("reactive_power", "reactive_power_var"), ("power_factor", "power_factor"))
Row = tuple[Any, ...]


def cycle_rows(cycle: Cycle, phases: str = DEFAULT_PHASES) -> list[Row]:
    """Our schema: (time_ns, seq, stream, phase, *quantities) per stream × counted phase."""
    rows = []
    for stream in cycle.streams:
        for phase, r in stream.counted(phases):
            rows.append((cycle.time_ns, cycle.seq, stream.name, phase,
                         *(getattr(r, f) for f in ROW_FIELDS)))
    return rows


def bibimbap_data(cycle: Cycle) -> dict[str, Any]:
    """The reference sink's `data` object for one message.

    A value the sender left out is null (the reference would write 0); a stream
    without phase_b has no phase_b entry, and the phase_b sums cover the streams
    that have one.
    """
    sums: dict[str, dict[str, float]] = {}
    for stream in cycle.streams:
        for phase, r in stream.phases():
            acc = sums.setdefault(phase, {"real": 0.0, "reactive": 0.0})
            acc["real"] += r.real_power_w or 0.0
            acc["reactive"] += r.reactive_power_var or 0.0
    data: dict[str, Any] = {}
    for stream in cycle.streams:
        entry: dict[str, Any] = {}
        for phase, r in stream.phases():
            bucket: dict[str, Any] = {key: getattr(r, field) for key, field in BIBIMBAP_FIELDS}
            bucket["three_phase_real_power"] = sums[phase]["real"]
            bucket["three_phase_reactive_power"] = sums[phase]["reactive"]
            entry[phase] = bucket
        data[stream.name] = entry
    return data


def bibimbap_row(cycle: Cycle, received_ns: int) -> Row:
    """(time_ns, device, data JSON) for one message."""
    return (received_ns, BIBIMBAP, json.dumps(bibimbap_data(cycle), separators=(",", ":")))


class Sink(Protocol):
    schema: str

    def write(self, rows: list[Row]) -> None: ...

    def close(self) -> None: ...


class SqliteSink:
    """Rows into a SQLite file (WAL), created with its table and time index if new."""

    def __init__(self, path: Path, schema: str = "karman") -> None:
        self.schema = schema
        try:
            self.db = sqlite3.connect(path)
            self.db.execute("PRAGMA journal_mode=WAL")
            if schema == BIBIMBAP:
                # time: ISO 8601 UTC text with microseconds (SQLite has no timestamptz)
                self.db.execute(f"CREATE TABLE IF NOT EXISTS {BIBIMBAP} (time TEXT NOT NULL, "
                                "device TEXT NOT NULL, data TEXT NOT NULL)")
                self.db.execute(f"CREATE INDEX IF NOT EXISTS {BIBIMBAP}_time_idx "
                                f"ON {BIBIMBAP}(time)")
            else:
                cols = ", ".join(f"{f} REAL" for f in ROW_FIELDS)
                self.db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (time_ns INTEGER NOT NULL, "
                                f"seq INTEGER, stream TEXT NOT NULL, phase TEXT NOT NULL, {cols})")
                self.db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE}(time_ns)")
            self.db.commit()
        except sqlite3.Error as exc:
            raise KarmanError(f"cannot record into {path}: {exc}") from exc
        if schema == BIBIMBAP:
            self._sql = (f"INSERT INTO {BIBIMBAP} VALUES (strftime('%Y-%m-%dT%H:%M:%f', "  # noqa: S608
                         "?, 'unixepoch') || 'Z', ?, ?)")
        else:
            marks = ", ".join("?" * (4 + len(ROW_FIELDS)))
            self._sql = f"INSERT INTO {TABLE} VALUES ({marks})"  # noqa: S608 - constant names

    def write(self, rows: list[Row]) -> None:
        if self.schema == BIBIMBAP:
            rows = [(r[0] / 1e9, *r[1:]) for r in rows]
        with self.db:
            self.db.executemany(self._sql, rows)

    def close(self) -> None:
        self.db.close()


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split())  # psycopg messages span lines


class PostgresSink:
    """Rows into PostgreSQL; `time` is timestamptz so Grafana/TimescaleDB use it directly."""

    def __init__(self, url: str, schema: str = "karman") -> None:
        self.schema = schema
        try:
            import psycopg  # noqa: PLC0415 - only the PostgreSQL path needs it
        except ImportError as exc:
            raise KarmanError("recording to PostgreSQL needs psycopg "
                              "(pip install 'spark-slurm[postgres]')") from exc
        try:
            self.db = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise KarmanError(f"cannot connect to PostgreSQL: {_why(exc)}") from exc
        table = BIBIMBAP if schema == BIBIMBAP else TABLE
        try:
            self.hypertable = self._create_table()
        except psycopg.Error as exc:
            self.db.close()
            raise KarmanError(f"cannot create {table} in PostgreSQL: {_why(exc)}") from exc
        stamp = "to_timestamp(%s::double precision / 1e9)"
        if schema == BIBIMBAP:
            self._sql = f"INSERT INTO {BIBIMBAP} VALUES ({stamp}, %s, %s::jsonb)"  # noqa: S608
        else:
            marks = ", ".join(["%s"] * (4 + len(ROW_FIELDS)))
            self._sql = f"INSERT INTO {TABLE} VALUES ({stamp}, {marks})"  # noqa: S608

    def _timescale(self) -> bool:
        available = self.db.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
        if available:
            self.db.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return bool(available)

    def _create_table(self) -> bool:
        """Create the table (a hypertable when TimescaleDB is available); True if hyper."""
        if self.schema == BIBIMBAP:
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {BIBIMBAP} (time TIMESTAMPTZ NOT NULL, "
                            "device TEXT NOT NULL, data JSONB NOT NULL)")
            hyper = self._timescale()
            if hyper:
                self.db.execute(f"SELECT create_hypertable('{BIBIMBAP}', 'time', "
                                "partitioning_column => 'device', number_partitions => 4, "
                                "if_not_exists => TRUE)")
            self.db.execute(f"CREATE INDEX IF NOT EXISTS {BIBIMBAP}_time_idx "
                            f"ON {BIBIMBAP} (time DESC)")
            self.db.execute(f"CREATE INDEX IF NOT EXISTS {BIBIMBAP}_device_idx "
                            f"ON {BIBIMBAP} (device)")
            return hyper
        cols = ", ".join(f"{f} DOUBLE PRECISION" for f in ROW_FIELDS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (time TIMESTAMPTZ NOT NULL, "
                        f"time_ns BIGINT NOT NULL, seq BIGINT, stream TEXT NOT NULL, "
                        f"phase TEXT NOT NULL, {cols})")
        hyper = self._timescale()
        if hyper:
            self.db.execute(f"SELECT create_hypertable('{TABLE}', 'time', if_not_exists => TRUE)")
        else:
            self.db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE}(time)")
        return hyper

    def write(self, rows: list[Row]) -> None:
        with self.db.transaction(), self.db.cursor() as cur:
            if self.schema == BIBIMBAP:
                cur.executemany(self._sql, rows)
            else:
                cur.executemany(self._sql, [(r[0], *r) for r in rows])

    def close(self) -> None:
        self.db.close()


def open_sink(target: str, schema: str = "karman") -> Sink:
    """A PostgreSQL sink for postgresql:// (or postgres://) URLs, else a SQLite file."""
    if schema not in SCHEMAS:
        raise InputError(f"unknown recorder schema {schema!r} (choose {' or '.join(SCHEMAS)})")
    if target.startswith(("postgresql://", "postgres://")):
        return PostgresSink(target, schema)
    return SqliteSink(Path(target), schema)


@dataclass
class RecordStats:
    cycles: int = 0
    rows: int = 0


def record(cycles: Iterable[Cycle], sink: Sink, *, batch: int = 60,
           stop: threading.Event | None = None, phases: str = DEFAULT_PHASES,
           clock: Clock = SYSTEM_CLOCK) -> RecordStats:
    """Write every cycle to the sink in batches; flushes what is pending on exit.

    A bibimbap row is stamped with the time the cycle came out of `cycles` (the
    reference sink stamps its insert time, one message at a time).
    """
    check_phases(phases)
    stats = RecordStats()
    pending: list[Row] = []
    bibimbap = sink.schema == BIBIMBAP
    try:
        for cycle in cycles:
            if bibimbap:
                pending.append(bibimbap_row(cycle, clock.now_ns()))
            else:
                pending.extend(cycle_rows(cycle, phases))
            stats.cycles += 1
            if stats.cycles % batch == 0:
                sink.write(pending)
                stats.rows += len(pending)
                pending = []
            if stop is not None and stop.is_set():
                break
    finally:
        if pending:
            sink.write(pending)
            stats.rows += len(pending)
    return stats


def record_stream(endpoint: str, to: str, *, topic: str = DEFAULT_TOPIC,
                  schema: str = "karman", phases: str = DEFAULT_PHASES,
                  count: int | None = None, duration_s: float | None = None,
                  stop: threading.Event | None = None, batch: int = 60) -> RecordStats:
    """Subscribe to an endpoint and record every cycle into `to` (path or URL)."""
    from spark_slurm.karman.subscriber import iter_cycles  # noqa: PLC0415 - ZeroMQ is lazy

    check_phases(phases)
    sink = open_sink(to, schema)
    try:
        return record(iter_cycles(endpoint, topic, count=count, duration_s=duration_s,
                                  stop=stop), sink, stop=stop, phases=phases, batch=batch)
    finally:
        sink.close()
