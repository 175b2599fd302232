"""The reference recordings cut by their own cap plans: what the Karman stories compare with."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.demo.reference import reference_levels
from spark_slurm.errors import InputError
from spark_slurm.karman.synth import write_scenario

DATASETS = Path(__file__).resolve().parents[3] / "datasets"


def test_the_static_cap_holds_the_reference_rack_far_below_the_uncapped_run() -> None:
    nocap, static = (reference_levels(n, DATASETS) for n in ("no-cap", "static-300"))
    assert set(nocap) == set(static) == {"idle", "loaded"}
    for run in (nocap, static):                  # the same idle node: ~3.1 kW (README)
        assert 2900 < run["idle"] < 3300
    assert static["loaded"] < 0.5 * nocap["loaded"]
    assert 9000 < nocap["loaded"] < 13300 and 4000 < static["loaded"] < 6800


def test_partial_dynamic_is_cut_at_each_of_its_cap_steps() -> None:
    ref = reference_levels("dynamic-mid", DATASETS)
    steps = [f"{w} W #{c}" for c in (1, 2) for w in (900, 600, 300)]
    assert list(ref) == ["idle", "uncapped", *steps, "uncapped after"]
    for c in (1, 2):
        assert ref[f"900 W #{c}"] > ref[f"600 W #{c}"] > ref[f"300 W #{c}"]
        assert ref[f"300 W #{c}"] < 0.6 * ref["uncapped"]
    assert abs(ref["uncapped after"] / ref["uncapped"] - 1) < 0.05


def test_a_recording_too_short_for_its_plan_is_a_clear_error(tmp_path: Path) -> None:
    write_scenario("static-300", tmp_path / "sample2-b200-static-powercap.csv", seconds=30)
    with pytest.raises(InputError, match=r"sample2-b200-static-powercap\.csv: no cycles in"):
        reference_levels("static-300", tmp_path)


def test_a_missing_recording_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"sample1-b200-no-powercap\.csv"):
        reference_levels("no-cap", tmp_path)
