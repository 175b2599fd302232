"""Time-series sink for a Karman stream: every cycle, one row per stream × phase.

SQLite by default (a file path); PostgreSQL when given a `postgresql://` URL, as a
TimescaleDB hypertable when that extension is installed and a plain table
otherwise, so the same dashboards work either way. Rows are committed in batches
(every `batch` cycles and at the end), so a stop loses nothing already received.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spark_slurm.errors import KarmanError
from spark_slurm.karman.schema import DEFAULT_TOPIC, Cycle

TABLE = "karman_readings"
ROW_FIELDS = ("real_power_w", "apparent_power_va", "reactive_power_var", "power_factor",
              "voltage_rms", "voltage_dc_offset", "current_rms", "current_dc_offset")
Row = tuple[Any, ...]


def cycle_rows(cycle: Cycle) -> list[Row]:
    """(time_ns, seq, stream, phase, *quantities) for each stream × phase of a cycle."""
    rows = []
    for stream in cycle.streams:
        for phase, r in stream.phases():
            rows.append((cycle.time_ns, cycle.seq, stream.name, phase,
                         *(getattr(r, f) for f in ROW_FIELDS)))
    return rows


class Sink(Protocol):
    def write(self, rows: list[Row]) -> None: ...

    def close(self) -> None: ...


class SqliteSink:
    """Rows into a SQLite file (WAL), created with its table and time index if new."""

    def __init__(self, path: Path) -> None:
        try:
            self.db = sqlite3.connect(path)
            self.db.execute("PRAGMA journal_mode=WAL")
            cols = ", ".join(f"{f} REAL" for f in ROW_FIELDS)
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (time_ns INTEGER NOT NULL, "
                            f"seq INTEGER, stream TEXT NOT NULL, phase TEXT NOT NULL, {cols})")
            self.db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE}(time_ns)")
            self.db.commit()
        except sqlite3.Error as exc:
            raise KarmanError(f"cannot record into {path}: {exc}") from exc
        marks = ", ".join("?" * (4 + len(ROW_FIELDS)))
        self._sql = f"INSERT INTO {TABLE} VALUES ({marks})"  # noqa: S608 - constant names

    def write(self, rows: list[Row]) -> None:
        with self.db:
            self.db.executemany(self._sql, rows)

    def close(self) -> None:
        self.db.close()


class PostgresSink:
    """Rows into PostgreSQL; `time` is timestamptz so Grafana/TimescaleDB use it directly."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: PLC0415 - only the PostgreSQL path needs it
        except ImportError as exc:
            raise KarmanError("recording to PostgreSQL needs psycopg "
                              "(pip install 'spark-slurm[postgres]')") from exc
        try:
            self.db = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            why = " ".join(str(exc).split())  # psycopg messages span lines
            raise KarmanError(f"cannot connect to PostgreSQL: {why}") from exc
        try:
            self.hypertable = self._create_table()
        except psycopg.Error as exc:
            self.db.close()
            why = " ".join(str(exc).split())
            raise KarmanError(f"cannot create {TABLE} in PostgreSQL: {why}") from exc
        marks = ", ".join(["%s"] * (4 + len(ROW_FIELDS)))
        self._sql = (f"INSERT INTO {TABLE} VALUES "  # noqa: S608 - constant names
                     f"(to_timestamp(%s::double precision / 1e9), {marks})")

    def _create_table(self) -> bool:
        """Create the table (a hypertable when TimescaleDB is available); True if hyper."""
        cols = ", ".join(f"{f} DOUBLE PRECISION" for f in ROW_FIELDS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (time TIMESTAMPTZ NOT NULL, "
                        f"time_ns BIGINT NOT NULL, seq BIGINT, stream TEXT NOT NULL, "
                        f"phase TEXT NOT NULL, {cols})")
        available = self.db.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
        if available:
            self.db.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            self.db.execute(f"SELECT create_hypertable('{TABLE}', 'time', if_not_exists => TRUE)")
            return True
        self.db.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE}(time)")
        return False

    def write(self, rows: list[Row]) -> None:
        with self.db.transaction(), self.db.cursor() as cur:
            cur.executemany(self._sql, [(r[0], *r) for r in rows])

    def close(self) -> None:
        self.db.close()


def open_sink(target: str) -> Sink:
    """A PostgreSQL sink for postgresql:// (or postgres://) URLs, else a SQLite file."""
    if target.startswith(("postgresql://", "postgres://")):
        return PostgresSink(target)
    return SqliteSink(Path(target))


@dataclass
class RecordStats:
    cycles: int = 0
    rows: int = 0


def record(cycles: Iterable[Cycle], sink: Sink, *, batch: int = 60,
           stop: threading.Event | None = None) -> RecordStats:
    """Write every cycle to the sink in batches; flushes what is pending on exit."""
    stats = RecordStats()
    pending: list[Row] = []
    try:
        for cycle in cycles:
            pending.extend(cycle_rows(cycle))
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
                  count: int | None = None, duration_s: float | None = None,
                  stop: threading.Event | None = None) -> RecordStats:
    """Subscribe to an endpoint and record every cycle into `to` (path or URL)."""
    from spark_slurm.karman.subscriber import iter_cycles  # noqa: PLC0415 - ZeroMQ is lazy

    sink = open_sink(to)
    try:
        return record(iter_cycles(endpoint, topic, count=count, duration_s=duration_s,
                                  stop=stop), sink, stop=stop)
    finally:
        sink.close()
