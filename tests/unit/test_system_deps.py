"""scripts/system-deps.sh: quiet when everything is there, and a failure (exit 1, naming
what is missing) when something is missing and it cannot install it, so `make test`
stops at the real cause instead of failing later in some test."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "system-deps.sh"
# every command the script looks for, and what it runs itself
TOOLS = ("slurmctld", "munged", "lua5.1", "lua5.3", "lua5.4", "sqlite3", "openssl",
         "sha256sum", "promtool", "systemd-analyze", "initdb", "gcc", "ip", "nsenter", "ssh")


@pytest.fixture
def bindir() -> Iterator[Path]:
    """An otherwise empty PATH directory that nobody can reach (tmp_path may be 0700)."""
    path = Path(tempfile.mkdtemp(prefix="system-deps-"))
    os.chmod(path, 0o755)
    try:
        for real in ("id", "ls"):
            found = shutil.which(real)
            assert found is not None
            (path / real).symlink_to(found)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run_unprivileged(bindir: Path) -> subprocess.CompletedProcess[str]:
    """The script (on stdin: a 0700 checkout is unreadable to nobody) with only
    `bindir` on PATH, as nobody when we are root."""
    argv = ["/bin/bash", "-s"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.run(argv, input=SCRIPT.read_text(), env={"PATH": str(bindir)},
                          capture_output=True, text=True, timeout=60, check=False, cwd="/")


def test_missing_packages_without_root_fail(bindir: Path) -> None:
    done = _run_unprivileged(bindir)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("system-deps: missing slurm-wlm munge lua5.1")
    assert "prometheus" in done.stderr and "run as root" in done.stderr


def test_nothing_missing_is_quiet_and_ok(bindir: Path) -> None:
    for tool in TOOLS:
        fake = bindir / tool
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    done = _run_unprivileged(bindir)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
