"""`sparkctl karman ...`: documented commands, clear one-line errors, exit codes."""

from __future__ import annotations

import gzip
from pathlib import Path

import click
import pytest

from spark_slurm.cli import run
from spark_slurm.cli.karman_cmd import karman
from spark_slurm.karman.csvfile import read_recording


def test_every_karman_command_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(karman, click.Group)
    assert karman.help
    for name, command in karman.commands.items():
        assert command.help, name
        assert run(["karman", name, "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("tail", "replay", "sim", "synth", "exporter", "record"):
        assert name in out


def test_synth_writes_a_readable_recording(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv.gz"
    assert run(["karman", "synth", "dynamic", "--out", str(out), "--seconds", "2"]) == 0
    assert "wrote 720 rows" in capsys.readouterr().err
    with gzip.open(out, "rt") as handle:
        assert handle.readline().startswith("time,stream_name,phase,")
    assert len(read_recording(out).cycles) == 120


def test_replay_of_bad_csv_names_the_row(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("time,stream_name,phase,rms_voltage,dc_offset_voltage,rms_current,"
                   "dc_offset_current,real_power,apparent_power,reactive_power,power_factor\n"
                   "1,k1,phase_a,120,0,8,0,oops,1,1,0.9\n")
    code = run(["karman", "replay", str(csv), "--bind", "tcp://127.0.0.1:0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"sparkctl: {csv}:2: column real_power: 'oops' is not a number"


def test_missing_columns_and_files_are_usage_errors(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "short.csv"
    csv.write_text("time,stream_name,phase\n1,k,phase_a\n")
    assert run(["karman", "replay", str(csv)]) == 2
    assert "header lacks column(s) rms_voltage" in capsys.readouterr().err
    assert run(["karman", "replay", str(tmp_path / "nope.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bad_bind_address_is_a_clear_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.csv"
    assert run(["karman", "synth", "no-cap", "--out", str(out), "--seconds", "0.1"]) == 0
    assert run(["karman", "replay", str(out), "--bind", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert "cannot bind Karman publisher to bogus://x" in err
    assert "Traceback" not in err
