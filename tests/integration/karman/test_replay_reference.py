"""`sparkctl karman replay` follows the reference replayer's rules, on our shipped datasets too.

The reference replayer reads every row with serde into (time i64, stream_name,
phase, eight f32 values, optional u64 sequence_number), groups rows by time,
sends each stream as `threephase/<stream_name>` with phase_a copied into a
missing phase_b, numbers frames itself when sequence_number is absent, and
paces at a fixed 60 Hz with utc_time = start + index/60 s.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spark_slurm.karman import KarmanSubscriber
from spark_slurm.karman.schema import Cycle, decode_payload
from spark_slurm.karman.synth import SCENARIOS
from spark_slurm.karman.transport import FrameReceiver
from tests.integration.daemon.conftest import _free_port
from tests.integration.karman.conftest import write_known_csv

DATASETS = Path(__file__).resolve().parents[3] / "datasets"
FLOATS = ("rms_voltage", "dc_offset_voltage", "rms_current", "dc_offset_current",
          "real_power", "apparent_power", "reactive_power", "power_factor")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_shipped_datasets_parse_under_the_reference_row_rules(name: str) -> None:
    with (DATASETS / SCENARIOS[name].file).open(newline="") as handle:
        rows = csv.DictReader(handle)
        times = set()
        for n, row in enumerate(rows):
            int(row["time"])  # i64 milliseconds
            assert row["stream_name"] in ("karman1", "karman2", "karman3")
            assert row["phase"] == "phase_a"
            for column in FLOATS:
                float(row[column])  # present and numeric: serde has no default for these
            assert int(row["sequence_number"]) >= 0
            times.add(row["time"])
            if n > 3000:
                break
        assert len(times) == 1001  # three rows (one per phase) per cycle


def _receive(endpoint: str, frames: int) -> list[tuple[int, Cycle]]:
    receiver = FrameReceiver(endpoint, "cycle-aligned")
    got: list[tuple[int, Cycle]] = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < frames and time.monotonic() < deadline:
            frame = receiver.recv(100)
            if frame is not None:
                got.append((time.monotonic_ns(), decode_payload(frame[len("cycle-aligned"):])))
    finally:
        receiver.close()
    return got


def _replay(path: Path, endpoint: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "spark_slurm.cli", "karman", "replay", str(path), "--bind",
         endpoint, "--count", str(count), "--wait-subscriber", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_shipped_dataset_goes_out_as_the_reference_replay_sends_it() -> None:
    path = DATASETS / SCENARIOS["dynamic"].file
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = _replay(path, endpoint, 120)
    got = _receive(endpoint, 120)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert len(got) == 120
    with path.open(newline="") as handle:
        first = next(csv.DictReader(handle))
    cycles = [c for _, c in got]
    for cycle in cycles:
        assert [s.name for s in cycle.streams] == [
            "threephase/karman1", "threephase/karman2", "threephase/karman3"]
        assert all(s.phase_b == s.phase_a for s in cycle.streams)
    assert cycles[0].seq == int(first["sequence_number"])
    assert cycles[0].streams[0].phase_a.real_power_w == pytest.approx(
        float(first["real_power"]), rel=1e-6)
    # utc_time on the replay's schedule: exactly 1/60 s apart, whatever the CSV's jitter
    stamps = [c.time_ns for c in cycles]
    assert {b - a for a, b in itertools.pairwise(stamps)} <= {16_666_666, 16_666_667}
    assert abs(stamps[0] - time.time_ns()) < 30 * 10**9  # rewritten to now, not 2025
    wall = (got[-1][0] - got[0][0]) / 1e9
    assert 119 / 60 * 0.8 < wall < 119 / 60 * 2  # paced at 60 Hz, not sent in a burst


def test_plain_or_gzip_without_sequence_numbers(tmp_path: Path) -> None:
    plain = write_known_csv(tmp_path / "ref.csv", 40, 17, phase_b=False, sequence=False)
    packed = tmp_path / "ref.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        endpoint = f"tcp://127.0.0.1:{_free_port()}"
        with KarmanSubscriber(endpoint) as sub:
            proc = _replay(path, endpoint, 40)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            deadline = time.monotonic() + 10
            while sub.stats()["decoded"] < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            cycles = sub.last_cycles(40)
        assert [c.seq for c in cycles] == list(range(40))  # numbered by the publisher
        assert sub.stats()["missing_phase_b"] == 0  # phase_b filled from phase_a
