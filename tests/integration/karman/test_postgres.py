"""`karman record` into a real PostgreSQL 15 started here from the Debian packages
(the `pg_url` fixture, tests/conftest.py: one fresh server per test)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from spark_slurm.cli import run
from spark_slurm.karman.csvfile import read_recording
from spark_slurm.karman.publisher import PublishStats
from spark_slurm.karman.recorder import BIBIMBAP, TABLE, PostgresSink, record
from spark_slurm.karman.transport import Publisher

Replayer = Callable[..., tuple[threading.Thread, list[PublishStats]]]

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_record_into_postgres_via_cli(pg_url: str, publisher: Publisher, replayer: Replayer,
                                      known_csv: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rec = read_recording(known_csv)
    thread, _ = replayer(known_csv, speed=5.0)
    code = run(["karman", "record", "--endpoint", publisher.endpoint, "--to", pg_url,
                "--count", "30", "--duration", "30"])
    assert code == 0, capsys.readouterr().err
    with psycopg.connect(pg_url) as db:
        count, seqs = db.execute(
            f"SELECT count(*), count(DISTINCT seq) FROM {TABLE}").fetchone() or (0, 0)
        assert (count, seqs) == (90, 30)  # streams are phases: phase_a rows only
        real = db.execute(f"SELECT real_power_w, extract(epoch FROM time) * 1e9 - time_ns "
                          f"FROM {TABLE} WHERE seq = 29 AND stream = 'threephase/karman1' "
                          "AND phase = 'phase_a'").fetchone()
        assert real is not None
        want = rec.cycles[29].streams[0].phase_a.real_power_w
        assert real[0] == pytest.approx(want, rel=1e-6)
        assert abs(real[1]) < 2_000  # timestamptz agrees with time_ns to the microsecond
    thread.join(10)


def test_plain_table_without_timescaledb_and_append(pg_url: str, known_csv: Path) -> None:
    rec = read_recording(known_csv)
    sink = PostgresSink(pg_url)
    try:
        assert sink.hypertable is False  # the extension is not installed here
        stats = record(iter(rec.cycles[:10]), sink, batch=4)
    finally:
        sink.close()
    assert stats.rows == 30
    sink = PostgresSink(pg_url)  # reopening keeps the table and appends
    try:
        record(iter(rec.cycles[:1]), sink)
        row = sink.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        assert row == (33,)
    finally:
        sink.close()


def test_unreachable_postgres_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    code = run(["karman", "record", "--endpoint", "tcp://127.0.0.1:1", "--to",
                f"postgresql://nobody@127.0.0.1:{port}/x?connect_timeout=2", "--count", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("sparkctl: cannot connect to PostgreSQL")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# The reference per-cycle dashboard's queries (Grafana's $__time/$__timeFilter macros
# expanded as Grafana does for PostgreSQL), verbatim otherwise.
PER_PHASE_SQL = """SELECT
  time AS "time",
  CASE
    WHEN 'real_power' IN ('real_power','reactive_power','apparent_power') THEN
      (data -> 'threephase/karman{k}' -> 'phase_a' ->> 'real_power')::double precision / 1000
    ELSE
      (data -> 'threephase/karman{k}' -> 'phase_a' ->> 'real_power')::double precision
  END AS "Phase {letter}"
FROM bibimbap
WHERE device = 'bibimbap'
  AND time BETWEEN now() - interval '1 hour' AND now() + interval '1 minute'
ORDER BY time"""
THREE_PHASE_SQL = """SELECT
  time AS "time",
  (data -> 'threephase/karman1' -> 'phase_a' ->> 'three_phase_real_power')::double precision
    / 1000 AS "Three-Phase Real Power"
FROM bibimbap
WHERE device = 'bibimbap'
  AND time BETWEEN now() - interval '1 hour' AND now() + interval '1 minute'
ORDER BY time"""


def test_bibimbap_schema_serves_the_reference_dashboard_queries(
        pg_url: str, publisher: Publisher, replayer: Replayer, reference_csv: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rec = read_recording(reference_csv)
    thread, _ = replayer(reference_csv, speed=2.0)
    code = run(["karman", "record", "--endpoint", publisher.endpoint, "--to", pg_url,
                "--schema", "bibimbap", "--count", str(len(rec.cycles)), "--duration", "30"])
    assert code == 0, capsys.readouterr().err
    thread.join(10)
    with psycopg.connect(pg_url) as db:
        columns = db.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            f"WHERE table_name = '{BIBIMBAP}' ORDER BY ordinal_position").fetchall()
        assert columns == [("time", "timestamp with time zone", "NO"),
                           ("device", "text", "NO"), ("data", "jsonb", "NO")]
        assert db.execute(f"SELECT count(*), count(DISTINCT device) FROM {BIBIMBAP}"
                          ).fetchone() == (len(rec.cycles), 1)
        # plain PostgreSQL here (Debian ships no TimescaleDB): not a hypertable
        assert db.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
                          ).fetchone() == (0,)
        for k, letter in ((1, "A"), (2, "B"), (3, "C")):
            got = [r[1] for r in db.execute(PER_PHASE_SQL.format(k=k, letter=letter))]
            want = [(c.streams[k - 1].phase_a.real_power_w or 0.0) / 1000 for c in rec.cycles]
            assert got == pytest.approx(want, rel=1e-6)
        three = [r[1] for r in db.execute(THREE_PHASE_SQL)]
        # Σ phase_a over the three streams: the rack, never a + b
        assert three == pytest.approx([c.real_power_w() / 1000 for c in rec.cycles], rel=1e-6)
        b = db.execute(f"SELECT data -> 'threephase/karman2' -> 'phase_b' ->> 'real_power', "
                       f"data -> 'threephase/karman2' -> 'phase_a' ->> 'real_power' "
                       f"FROM {BIBIMBAP} LIMIT 1").fetchone()
        assert b is not None and b[0] == b[1]  # the replay duplicated phase_a into phase_b
        timescale = PostgresSink(pg_url, "bibimbap")
        try:
            assert timescale.hypertable is False
        finally:
            timescale.close()
