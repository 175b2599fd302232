"""Synthetic recordings: reproducible, matching the shipped datasets, shaped like the scenarios."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from spark_slurm.errors import InputError
from spark_slurm.karman.csvfile import read_recording
from spark_slurm.karman.synth import SCENARIOS, synthesize, write_scenario

DATASETS = Path(__file__).resolve().parents[3] / "datasets"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_shipped_dataset_is_reproduced_by_its_command(scenario: str, tmp_path: Path) -> None:
    shipped = DATASETS / f"b200-{scenario}.csv.gz"
    out = tmp_path / "prefix.csv"
    write_scenario(scenario, out, seconds=5)
    prefix = out.read_text().splitlines()
    with gzip.open(shipped, "rt") as handle:
        head = [next(handle).rstrip("\n") for _ in range(len(prefix))]
    assert head == prefix


@pytest.mark.slow
def test_full_dataset_regenerates_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "dynamic.csv.gz"
    write_scenario("dynamic", out)
    assert out.read_bytes() == (DATASETS / "b200-dynamic.csv.gz").read_bytes()


def _gpu_level_kw(scenario: str, t0: float, t1: float) -> float:
    cycles = list(synthesize(scenario, seconds=t1))[int(t0 * 60):]
    node = sum(c.real_power_w() for c in cycles) / len(cycles)
    return (node - 1200) * 0.94 / 1000  # back to total GPU kW


def test_scenarios_show_their_caps() -> None:
    assert 7.0 < _gpu_level_kw("no-cap", 60, 70) < 8.0  # loaded, uncapped
    assert _gpu_level_kw("static-300", 60, 70) == pytest.approx(2.4, rel=0.03)
    levels = [_gpu_level_kw("dynamic", 60 + k * 10 + 2, 60 + k * 10 + 9) for k in range(3)]
    assert levels[0] == pytest.approx(7.2, rel=0.04)  # 900 W x 8
    assert levels[1] == pytest.approx(4.8, rel=0.03)  # 600 W x 8
    assert levels[2] == pytest.approx(2.4, rel=0.03)  # 300 W x 8
    assert _gpu_level_kw("dynamic-mid", 82, 89) == pytest.approx(2.4, rel=0.03)
    assert _gpu_level_kw("dynamic-mid", 132, 139) > 7.0


def test_dataset_files_are_valid_recordings() -> None:
    rec = read_recording(DATASETS / "b200-static-300.csv.gz")
    assert len(rec.cycles) == 180 * 60
    assert rec.has_sequence
    assert {s.name for s in rec.cycles[0].streams} == {
        "threephase/karman1", "threephase/karman2", "threephase/karman3"}
    for path in DATASETS.glob("*.csv.gz"):
        assert path.stat().st_size < 3_000_000


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="unknown scenario"):
        synthesize("nope")
    with pytest.raises(InputError, match="positive"):
        synthesize("dynamic", seconds=0)
