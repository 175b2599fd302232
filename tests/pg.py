"""A real PostgreSQL 15 server (Debian's binaries), started for tests in a temp dir.

Unix socket only (no TCP port to collide on), trust authentication, run as the
`postgres` user when the tests run as root. `PgServer.database()` gives each test
a fresh, empty database on one server. Missing binaries skip the tests, except
under CI, where they fail: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def require_postgres() -> None:
    if not (PG_BIN / "initdb").exists():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL 15 binaries missing under CI (make system-deps)")
        pytest.skip("PostgreSQL 15 binaries not installed")


def _as_postgres(*args: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return list(args)


class PgServer:
    """One postgres server: `url` for its `postgres` database, `database()` for more."""

    def __init__(self, *, durable: bool = True, prefix: str = "spark-pg-") -> None:
        require_postgres()
        self.base = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.base / "data"
        self.port = 5432  # only names the socket file, in our own directory
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        options = f"-k {self.base} -p {self.port} -c listen_addresses=''"
        if not durable:  # tests only: no fsync, nothing survives a crash
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            subprocess.run(_as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U",
                                        "postgres", "--auth=trust", "-E", "UTF8"),
                           check=True, capture_output=True)
            subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w",
                                        "-l", str(self.base / "log"), "-o", options, "start"),
                           check=True, capture_output=True, timeout=60)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.base}&port={self.port}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def database(self) -> str:
        """A new empty database on this server; its URL."""
        import psycopg  # noqa: PLC0415 (only PostgreSQL tests need it)

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        subprocess.run(_as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m",
                                    "immediate", "stop"), check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
