"""P3 on reference data: the rack power sparkd correlates against is Σ phase_a over streams.

A reference-layout recording (karman1..3, phase_a rows only, no sequence_number)
is replayed by `sparkctl karman replay` exactly as the reference replayer would
send it (phase_a duplicated into phase_b); a real sparkd, pointed at it by the
`karman.source: replay` switch, caps a job and writes the facility follow-up.
Its windows must show the rack as the sum of the three phases, not twice that.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.karman.csvfile import COLUMNS
from tests.integration.daemon.conftest import Sparkd, _free_port

SPARKCTL = str(Path(sys.executable).parent / "sparkctl")
PHASE_W = {"karman1": 3000.0, "karman2": 3125.5, "karman3": 2874.5}  # exact in float32
RACK_MW = round(sum(PHASE_W.values()) * 1000)  # 9 kW


def _reference_csv(path: Path, cycles: int = 120) -> Path:
    lines = [",".join(COLUMNS)]
    for i in range(cycles):
        t = 1_757_934_131_000 + i * 16 + (i % 3 == 0)
        for stream, watts in PHASE_W.items():
            amps = round(watts / 0.99 / 120.0, 3)
            lines.append(f"{t},{stream},phase_a,120.0,0.02,{amps},0.001,{watts},"
                         f"{round(watts / 0.99, 2)},{round(watts * 0.14, 2)},0.99")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[str]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([SPARKCTL, "karman", "replay", str(_reference_csv(tmp_path / "r.csv")),
                             "--bind", endpoint, "--loop"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield endpoint
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        assert proc.returncode in (0, -15), err


def _follow_up(root: Path, endpoint: str, phases: str) -> dict[str, Any]:
    sparkd = Sparkd(root)
    with sparkd.config.open("a") as conf:
        # the switch picks the replay; the live device (TEST-NET, unreachable) is not used
        conf.write(f"karman: {{source: replay, live_endpoint: 'tcp://192.0.2.1:5557', "
                   f"replay_endpoint: '{endpoint}', phases: {phases}}}\n")
    sparkd.add_job("701", gpus=[0, 1, 2, 3])
    sparkd.start()
    try:
        sparkd.fleet.set_load(1.0)
        deadline = time.monotonic() + 20
        while sparkd.request({"op": "status"})["karman"]["decoded"] < 150:
            assert time.monotonic() < deadline, "sparkd never received the replay"
            time.sleep(0.05)
        reply = sparkd.prolog("701", watts=1200, gpus=[0, 1, 2, 3])
        assert reply["ok"], reply
        record = sparkd.wait_record(
            lambda r: r["kind"] == "facility" and r["body"]["ref"]["seq"] == reply["seq"], 20,
            "facility follow-up")
        body: dict[str, Any] = record["body"]
        return body
    finally:
        sparkd.stop()


def test_p3_rack_power_is_the_sum_of_phase_a(tmp_path: Path, replay: str) -> None:
    body = _follow_up(tmp_path / "a", replay, "streams-are-phases")
    window = body["window"]
    # 1 s before the change, the second half of the 1 s after it: 60 and 30 cycles
    assert window["before"]["samples"] >= 55 and window["after"]["samples"] >= 25
    for side in ("before", "after"):
        assert window[side]["mean_mw"] == RACK_MW, body
        assert window[side]["min_mw"] == window[side]["max_mw"] == RACK_MW
    assert body["delta_mw"] == 0  # this recording does not follow our GPUs' cap


def test_two_phase_semantics_would_double_it(tmp_path: Path, replay: str) -> None:
    # The same frames read as two-phase meters: the old reading, 2x the truth on
    # reference data. It stays available for meters that really fill phase_b.
    body = _follow_up(tmp_path / "b", replay, "two-phase-per-stream")
    assert body["window"]["before"]["mean_mw"] == 2 * RACK_MW
