"""The root group is the one place errors become `sparkctl: message` and exit codes."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from spark_slurm.cli import cli, run
from spark_slurm.errors import CheckFailed, InputError


@cli.command("_raise", hidden=True)
@click.argument("what")
def _raise(what: str) -> None:
    """Test-only command that fails in a chosen way."""
    if what == "input":
        raise InputError("policy.yaml:3:7: unknown key 'watt'")
    if what == "check":
        raise CheckFailed("first bad seq 4: hash mismatch")
    if what == "interrupt":
        raise KeyboardInterrupt


@pytest.mark.parametrize(("what", "code", "text"), [
    ("input", 2, "sparkctl: policy.yaml:3:7: unknown key 'watt'"),
    ("check", 1, "sparkctl: first bad seq 4: hash mismatch"),
    ("interrupt", 130, "sparkctl: interrupted"),
])
def test_errors_map_to_one_line_and_exit_code(
        capsys: pytest.CaptureFixture[str], what: str, code: int, text: str) -> None:
    assert run(["_raise", what]) == code
    err = capsys.readouterr().err
    assert err.strip() == text
    assert "Traceback" not in err


def test_verbose_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--verbose", "_raise", "input"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_console_script_help_runs_in_a_fresh_interpreter() -> None:
    out = subprocess.run([sys.executable, "-m", "spark_slurm.cli", "--help"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "Govern GPU power" in out.stdout
