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
    rows = int(capsys.readouterr().err.split()[1])
    with gzip.open(out, "rt") as handle:
        assert handle.readline().startswith("time,stream_name,phase,")
        assert handle.readline().split(",")[1:3] == ["karman1", "phase_a"]
    cycles = len(read_recording(out).cycles)
    assert rows == 3 * cycles and 118 <= cycles <= 121  # ~60 Hz grid, one row per phase


def test_replay_of_bad_csv_names_the_row(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("time,stream_name,phase,rms_voltage,dc_offset_voltage,rms_current,"
                   "dc_offset_current,real_power,apparent_power,reactive_power,power_factor\n"
                   "1,karman1,phase_a,120,0,8,0,oops,1,1,0.9\n")
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


def test_replay_names_a_stream_outside_the_layout(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "other.csv"
    csv.write_text("time,stream_name,phase,rms_voltage,dc_offset_voltage,rms_current,"
                   "dc_offset_current,real_power,apparent_power,reactive_power,power_factor\n"
                   "1,pdu1,phase_a,120,0,8,0,1,1,1,0.9\n")
    assert run(["karman", "replay", str(csv), "--bind", "tcp://127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"sparkctl: {csv}:2: stream 'pdu1' is outside the layout (karman1, "
                           "karman2, karman3); pass --streams to replay other names")
    assert run(["karman", "replay", str(csv), "--bind", "tcp://127.0.0.1:0", "--streams",
                "pdu1", "--count", "1"]) == 0


def test_bad_tool_config_names_file_and_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "karman.yaml"
    conf.write_text("karman:\n  source: live\n  topic: cycle-aligned\n")
    assert run(["karman", "exporter", "--config", str(conf), "--duration", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"sparkctl: {conf}:2:11: karman.source: live needs live_endpoint "
                           "(the Karman device, e.g. tcp://DEVICE:5557)")
    conf.write_text("karman:\n  phases: six-legs\n")
    assert run(["karman", "tail", "--config", str(conf), "--count", "1"]) == 2
    assert f"{conf}:2:11: karman.phases: unknown phase semantics" in capsys.readouterr().err
    conf.write_text("exporter:\n  prot: 9105\n")
    assert run(["karman", "exporter", "--config", str(conf)]) == 2
    assert "exporter.prot: unknown key" in capsys.readouterr().err
    assert run(["karman", "record", "--endpoint", "tcp://127.0.0.1:1", "--count", "1"]) == 2
    assert "give --to" in capsys.readouterr().err
