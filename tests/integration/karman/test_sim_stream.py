"""`sparkctl karman sim` over real simulated GPUs: a cap change is a step in rack power."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spark_slurm.gpu import open_backend
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.karman import KarmanSubscriber
from spark_slurm.karman.rack import RackModel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gpu_total_mw(state: Path) -> int:
    gpu = open_backend("sim", state_dir=state)
    return sum(gpu.sample(d.index).power_mw for d in gpu.devices())


def test_cap_change_shows_up_as_a_rack_power_step(tmp_path: Path) -> None:
    state = tmp_path / "gpus"
    fleet = SimFleet.init(state, 8, "b200")
    fleet.set_load(1.0)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spark_slurm.cli", "karman", "sim", "--gpus", str(state),
         "--bind", endpoint, "--wait-subscriber", "20", "--duration", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with KarmanSubscriber(endpoint) as sub:
            time.sleep(2.0)  # power settles at full load (tau 0.2 s)
            t = time.time_ns()
            before = sub.window(t - 500_000_000, t)
            gpu_before = _gpu_total_mw(state)
            fleet.oob_set_limit(None, 300_000)
            time.sleep(2.0)
            t = time.time_ns()
            after = sub.window(t - 500_000_000, t)
            gpu_after = _gpu_total_mw(state)
            counts = sub.stats()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert before.samples >= 20 and after.samples >= 20
    assert gpu_after < gpu_before - 2_000_000  # the cap really bit
    rack = RackModel()  # what `karman sim` runs: fixed host floor, the PSUs' losses
    expected_step = 1000 * (rack.node_power_w(gpu_before / 1000)
                            - rack.node_power_w(gpu_after / 1000))
    assert before.mean_mw - after.mean_mw == pytest.approx(expected_step, rel=0.1)
    assert before.mean_mw == pytest.approx(1000 * rack.node_power_w(gpu_before / 1000),
                                           rel=0.05)
    assert counts["dropped"] == 0 and counts["bad_frames"] == 0
    assert before.streams == 3
