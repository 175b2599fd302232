"""Path 3 against a live `sparkctl karman sim` stream: correlated when the rack follows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.gpu.sim import SimFleet
from tests.integration.daemon.conftest import Sparkd, _free_port

SPARKCTL = str(Path(sys.executable).parent / "sparkctl")


@pytest.fixture
def karman(root: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield f"tcp://127.0.0.1:{_free_port()}", procs
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _publish(endpoint: str, sim_dir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    procs.append(subprocess.Popen([SPARKCTL, "karman", "sim", "--gpus", str(sim_dir),
                                   "--bind", endpoint, "--rate", "60"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def _cap_and_follow_up(sparkd: Sparkd) -> dict[str, object]:
    sparkd.add_job("601", gpus=[0, 1, 2, 3])
    sparkd.start()
    sparkd.fleet.set_load(1.0)
    time.sleep(3.0)  # a full `before` window of frames and telemetry at full load
    reply = sparkd.prolog("601", watts=1200, gpus=[0, 1, 2, 3])  # 300 W/GPU
    assert reply["ok"], reply
    record = sparkd.wait_record(
        lambda r: r["kind"] == "facility" and r["body"]["ref"]["seq"] == reply["seq"], 15,
        "facility follow-up")
    body: dict[str, object] = record["body"]
    return body


def test_rack_following_the_caps_is_correlated(root: Path,
                                               karman: tuple[str, list[subprocess.Popen[bytes]]]
                                               ) -> None:
    endpoint, procs = karman
    sparkd = Sparkd(root, karman=endpoint, thermal_c=(95, 90))
    _publish(endpoint, sparkd.sim_dir, procs)
    try:
        body = _cap_and_follow_up(sparkd)
        assert body["verdict"] == "correlated", json.dumps(body)
        assert isinstance(body["expected_delta_mw"], int) and body["expected_delta_mw"] < -1_500_000
        assert isinstance(body["delta_mw"], int) and body["delta_mw"] < -1_500_000
        window = body["window"]
        assert isinstance(window, dict) and window["before"]["samples"] > 30
        status = sparkd.request({"op": "status"})
        assert status["karman"]["frames"] > 0
    finally:
        sparkd.stop()


def test_rack_not_reacting_is_flagged(root: Path,
                                      karman: tuple[str, list[subprocess.Popen[bytes]]]) -> None:
    endpoint, procs = karman
    elsewhere = root / "other-rack"
    SimFleet.init(elsewhere, 8, "b200")  # a rack whose GPUs are not the ones we cap
    sparkd = Sparkd(root / "node", karman=endpoint, thermal_c=(95, 90))
    _publish(endpoint, elsewhere, procs)
    try:
        body = _cap_and_follow_up(sparkd)
        assert body["verdict"] == "flagged", json.dumps(body)
        assert isinstance(body["delta_mw"], int) and abs(body["delta_mw"]) < 500_000
    finally:
        sparkd.stop()
