"""`karman record` into a real PostgreSQL 15 started here from the Debian packages."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from spark_slurm.cli import run
from spark_slurm.karman.csvfile import read_recording
from spark_slurm.karman.publisher import PublishStats
from spark_slurm.karman.recorder import TABLE, PostgresSink, record
from spark_slurm.karman.transport import Publisher

PG_BIN = Path("/usr/lib/postgresql/15/bin")
Replayer = Callable[..., tuple[threading.Thread, list[PublishStats]]]

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return list(args)


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL 15 binaries missing under CI (make system-deps)")
        pytest.skip("PostgreSQL 15 binaries not installed")
    base = Path(tempfile.mkdtemp(prefix="karman-pg-"))
    data = base / "data"
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    try:
        subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                                    "--auth=trust", "-E", "UTF8"),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l",
                                    str(base / "log"), "-o",
                                    f"-k {base} -p {port} -c listen_addresses=''", "start"),
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@/postgres?host={base}&port={port}"
    finally:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                    "stop"), check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


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
        assert (count, seqs) == (180, 30)
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
    assert stats.rows == 60
    sink = PostgresSink(pg_url)  # reopening keeps the table and appends
    try:
        record(iter(rec.cycles[:1]), sink)
        row = sink.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        assert row == (66,)
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
