"""`sparkctl sim`: init, smi (and smi -pl out of band), fault, load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.errors import GpuLost
from spark_slurm.gpu import open_backend

Capture = pytest.CaptureFixture[str]


@pytest.fixture
def fleet(tmp_path: Path, capsys: Capture) -> Path:
    d = tmp_path / "fleet"
    assert run(["sim", "init", str(d), "--gpus", "4", "--model", "h100",
                "--minors", "3,2,1,0"]) == 0
    assert "initialised 4 x NVIDIA H100" in capsys.readouterr().out
    return d


def test_init_json_lists_the_devices(tmp_path: Path, capsys: Capture) -> None:
    assert run(["sim", "init", str(tmp_path / "f"), "--gpus", "2", "--minor-base", "6",
                "--json"]) == 0
    devs = json.loads(capsys.readouterr().out)
    assert [(d["index"], d["minor"]) for d in devs] == [(0, 6), (1, 7)]


def test_smi_lists_every_gpu(fleet: Path, capsys: Capture) -> None:
    assert run(["sim", "load", str(fleet), "--util", "0.5"]) == 0
    assert run(["sim", "smi", str(fleet)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("GPU")
    assert len(out) == 6  # load's line, the header, four GPUs
    assert "NVIDIA H100 80GB HBM3" in out[2]
    assert "/ 700W" in out[2]


def test_smi_pl_changes_the_limit_out_of_band(fleet: Path, capsys: Capture) -> None:
    gpu = open_backend("sim", state_dir=fleet)
    assert run(["sim", "smi", str(fleet), "-i", "1", "-pl", "300"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Power limit for GPU 00000000:2A:00.0 was set to 300.00 W from 700.00 W.",
        "All done."]
    assert gpu.limits(1).enforced_mw == 300_000
    assert gpu.limits(0).enforced_mw == 700_000
    assert run(["sim", "smi", str(fleet), "-i", "1"]) == 0
    detail = capsys.readouterr().out
    assert "Current Power Limit             : 300.00 W" in detail
    assert "Minor Number                    : 2" in detail


def test_smi_pl_from_another_process_reaches_the_daemon_side(fleet: Path) -> None:
    gpu = open_backend("sim", state_dir=fleet)
    done = subprocess.run([sys.executable, "-m", "spark_slurm.cli", "sim", "smi", str(fleet),
                           "-pl", "450"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("was set to 450.00 W") == 4
    assert {gpu.limits(i).enforced_mw for i in range(4)} == {450_000}


def test_smi_pm_turns_persistence_off(fleet: Path, capsys: Capture) -> None:
    gpu = open_backend("sim", state_dir=fleet)
    assert run(["sim", "smi", str(fleet), "-i", "3", "-pm", "0"]) == 0
    assert "Disabled persistence mode for GPU 00000000:5D:00.0." in capsys.readouterr().out
    assert [gpu.persistence_mode(i) for i in range(4)] == [True, True, True, False]
    assert run(["sim", "smi", str(fleet), "-pm", "1"]) == 0
    assert gpu.persistence_mode(3) is True


def test_smi_json(fleet: Path, capsys: Capture) -> None:
    assert run(["sim", "smi", str(fleet), "-i", "2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["device"]["minor"] == 1
    assert row["limits"]["enforced_mw"] == 700_000
    assert row["error"] is None


def test_fault_then_smi_shows_the_lost_gpu(fleet: Path, capsys: Capture) -> None:
    assert run(["sim", "fault", str(fleet), "--gpu", "2", "driver-crash", "--for", "60"]) == 0
    assert "GPU 2: driver-crash for 60 s" in capsys.readouterr().out
    with pytest.raises(GpuLost):
        open_backend("sim", state_dir=fleet).sample(2)
    assert run(["sim", "smi", str(fleet)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ERR!" in lines[3] and "GPU is lost" in lines[3]
    assert run(["sim", "smi", str(fleet), "-i", "2", "-pl", "400"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sparkctl: GPU 2: GPU is lost (simulated driver crash)"
    assert run(["sim", "fault", str(fleet), "--gpu", "2", "clear"]) == 0
    assert open_backend("sim", state_dir=fleet).limits(2).enforced_mw == 700_000


@pytest.mark.parametrize(("args", "message"), [
    (["init", "{tmp}/new", "--gpus", "2", "--model", "z100"], "unknown GPU model 'z100'"),
    (["smi", "{tmp}/missing"], "{tmp}/missing: state directory does not exist"),
    (["smi", "{fleet}", "-pl", "-5"], "power limit must be a positive number of watts"),
    (["smi", "{fleet}", "-i", "0", "-pl", "900"], "GPU 0: power limit 900 W is outside 200-700 W"),
    (["smi", "{fleet}", "-i", "9"], "GPU 9: no such simulated GPU (fleet has 4)"),
    (["smi", "{fleet}", "-pl", "nan"], "nan is not a number of watts"),
    (["init", "{tmp}/new", "--gpus", "2", "--minors", "1,x"], "--minors: '1,x' is not a"),
    (["load", "{fleet}", "--util", "nan"], "utilisation must be a fraction between 0 and 1"),
    (["fault", "{fleet}", "--gpu", "0", "thermal-spike", "--for", "inf"],
     "--for must be a positive number of seconds"),
    (["load", "{fleet}", "--util", "1.5"], "utilisation must be a fraction between 0 and 1"),
    (["fault", "{fleet}", "--gpu", "0", "gremlins"], "unknown fault 'gremlins'"),
    (["fault", "{fleet}", "--gpu", "0", "driver-crash", "--for", "-2"],
     "--for must be a positive number of seconds"),
])
def test_bad_input_is_one_line_and_exit_2(fleet: Path, tmp_path: Path, capsys: Capture,
                                          args: list[str], message: str) -> None:
    argv = [a.format(tmp=tmp_path, fleet=fleet) for a in args]
    assert run(["sim", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sparkctl: ")
    assert message.format(tmp=tmp_path) in err
    assert "Traceback" not in err


def test_corrupt_state_file_is_named(fleet: Path, capsys: Capture) -> None:
    (fleet / "gpu3.json").write_text("{\"half\": ")
    assert run(["sim", "smi", str(fleet)]) == 2
    err = capsys.readouterr().err
    assert f"{fleet}/gpu3.json: corrupt GPU state file" in err


def test_every_sim_command_is_documented(capsys: Capture) -> None:
    for sub in ("init", "smi", "fault", "load"):
        assert run(["sim", sub, "--help"]) == 0
        assert "Usage:" in capsys.readouterr().out
