"""Synthetic recordings: reproducible, shipped in the reference layout, physically plausible.

The physical checks read the shipped files themselves, so a regenerated dataset
that lost a property (cadence jitter, load-dependent power factor, voltage sag,
currents on the scale of a real node) fails here.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.errors import InputError
from spark_slurm.karman.csvfile import COLUMNS, SEQ_COLUMN, Recording, read_recording
from spark_slurm.karman.schema import Cycle
from spark_slurm.karman.synth import SCENARIOS, TDP_W, plan, synthesize, write_scenario

DATASETS = Path(__file__).resolve().parents[3] / "datasets"
NODE_MAX_W = 14_300  # 8 x B200 HGX node's rated draw
BREAKER_A = 60
REFERENCE_FILES = ["sample1-b200-no-powercap.csv", "sample2-b200-static-powercap.csv",
                   "sample3-b200-dynamic-powercap.csv",
                   "sample4-b200-partial-dynamic-powercap.csv"]

_loaded: dict[str, Recording] = {}


def shipped(name: str) -> Recording:
    if name not in _loaded:
        _loaded[name] = read_recording(DATASETS / SCENARIOS[name].file)
    return _loaded[name]


def test_shipped_files_have_the_reference_names_and_layout() -> None:
    assert sorted(s.file for s in SCENARIOS.values()) == REFERENCE_FILES
    assert sorted(p.name for p in DATASETS.glob("*.csv")) == REFERENCE_FILES
    for name in SCENARIOS:
        path = DATASETS / SCENARIOS[name].file
        assert path.read_bytes()[:2] != b"\x1f\x8b"  # plain CSV, as the reference ships
        assert path.stat().st_size < 8_000_000
        with path.open() as handle:
            assert handle.readline().strip() == ",".join([*COLUMNS, SEQ_COLUMN])
        rec = shipped(name)
        assert rec.layout == (("karman1", False), ("karman2", False), ("karman3", False))
        assert rec.has_sequence


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_shipped_dataset_is_reproduced_by_its_command(name: str, tmp_path: Path) -> None:
    out = tmp_path / "prefix.csv"
    write_scenario(name, out, seconds=5)
    prefix = out.read_text().splitlines()
    with (DATASETS / SCENARIOS[name].file).open() as handle:
        head = [next(handle).rstrip("\n") for _ in range(len(prefix))]
    assert head == prefix
    assert len(prefix) > 5 * 59 * 3


@pytest.mark.slow
def test_full_dataset_regenerates_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "dynamic.csv"
    write_scenario("dynamic", out)
    assert out.read_bytes() == (DATASETS / SCENARIOS["dynamic"].file).read_bytes()


def _seconds(rec: Recording) -> float:
    return (rec.cycles[-1].time_ns - rec.cycles[0].time_ns) / 1e9


def test_runs_are_three_to_six_minutes_and_all_different() -> None:
    lengths = [_seconds(shipped(name)) for name in SCENARIOS]
    assert all(180 <= s <= 360 for s in lengths), lengths
    assert min(abs(a - b) for i, a in enumerate(lengths) for b in lengths[i + 1:]) > 5


def test_cadence_is_the_grid_with_recorder_jitter() -> None:
    for name in SCENARIOS:
        rec = shipped(name)
        steps_ms = [(b.time_ns - a.time_ns) // 1_000_000
                    for a, b in zip(rec.cycles, rec.cycles[1:], strict=False)]
        assert len(set(steps_ms)) >= 3  # 16 and 17 ms, and jitter around them
        assert statistics.median(steps_ms) in (16, 17)
        # ~60 Hz on average, but not exactly: the grid frequency wanders
        hz = (len(rec.cycles) - 1 + _missed(rec)) / _seconds(rec)
        assert 59.9 < hz < 60.1
        assert all(s >= 1 for s in steps_ms)


def _missed(rec: Recording) -> int:
    seqs = [c.seq or 0 for c in rec.cycles]
    return seqs[-1] - seqs[0] - (len(seqs) - 1)


def _phase_a(rec: Recording) -> Iterator[tuple[float, float, float, float, float]]:
    """(node W, phase W, V, A, PF) per cycle and phase."""
    for c in rec.cycles:
        total = c.real_power_w()
        for s in c.streams:
            r = s.phase_a
            assert r.real_power_w and r.voltage_rms and r.current_rms and r.power_factor
            yield total, r.real_power_w, r.voltage_rms, r.current_rms, r.power_factor


def _by_load(rec: Recording, k: int) -> tuple[float, float]:
    """Mean of column k over the lightest and the heaviest tenth of the cycles."""
    rows = sorted(_phase_a(rec))
    tenth = len(rows) // 10
    return (statistics.fmean(r[k] for r in rows[:tenth]),
            statistics.fmean(r[k] for r in rows[-tenth:]))


def test_power_factor_and_reactive_power_depend_on_load() -> None:
    rec = shipped("no-cap")
    light_pf, heavy_pf = _by_load(rec, 4)
    assert 0.95 < light_pf < heavy_pf - 0.01 and heavy_pf < 0.999
    ratios = sorted((c.real_power_w(), sum(s.phase_a.reactive_power_var or 0 for s in c.streams)
                     / c.real_power_w()) for c in rec.cycles)
    tenth = len(ratios) // 10
    light_q = statistics.fmean(q for _, q in ratios[:tenth])
    heavy_q = statistics.fmean(q for _, q in ratios[-tenth:])
    assert light_q > 1.5 * heavy_q  # Q/P falls as the PSUs' distortion falls with load


def test_voltage_sags_under_load_through_the_feed() -> None:
    light_v, heavy_v = _by_load(shipped("no-cap"), 2)
    assert 1.0 < light_v - heavy_v < 4.0  # a few volts across the feed at ~40 A
    assert 117 < heavy_v < light_v < 123


def test_currents_and_peak_are_those_of_a_real_8_b200_node() -> None:
    rec = shipped("no-cap")
    peak = max(c.real_power_w() for c in rec.cycles)
    assert 0.85 * NODE_MAX_W < peak < NODE_MAX_W
    amps = max(s.phase_a.current_rms or 0 for c in rec.cycles for s in c.streams)
    assert 30 < amps < 0.8 * BREAKER_A  # ~40 A per phase at full draw, below the breaker
    idle = statistics.fmean(c.real_power_w() for c in rec.cycles[:300])
    assert 2_000 < idle < 4_000  # idle node before the client starts
    static = shipped("static-300")
    busy = sorted(c.real_power_w() for c in static.cycles)
    assert busy[int(0.99 * len(busy))] < 0.5 * peak  # 300 W x 8 caps the node well down


def _mean_kw(rec: Recording, t0: float, t1: float) -> float:
    start = rec.cycles[0].time_ns
    sel = [c for c in rec.cycles if t0 <= (c.time_ns - start) / 1e9 < t1]
    return statistics.fmean(c.real_power_w() for c in sel) / 1000


def test_dynamic_steps_are_jittered_and_the_rack_follows_them() -> None:
    steps = plan("dynamic").steps
    spans = [b[0] - a[0] for a, b in itertools.pairwise(steps[1:41])]
    assert 10.0 < statistics.fmean(spans) < 11.0  # ~10 s increments ...
    assert statistics.pstdev(spans) > 0.05  # ... never exactly
    rec = shipped("dynamic")
    levels: dict[float, list[float]] = {900.0: [], 600.0: [], 300.0: []}
    for (t, watts), (t_next, _) in itertools.pairwise(steps[1:]):
        if t_next > plan("dynamic").lead_s + 170:
            break
        if t > plan("dynamic").lead_s + 25:  # at load
            levels[watts].append(_mean_kw(rec, t + 2, t_next))
    means = {w: statistics.fmean(v) for w, v in levels.items()}
    assert means[300.0] < means[600.0] < means[900.0]
    assert means[900.0] - means[300.0] > 2.5  # 8 x 600 W less at the GPUs


def test_partial_dynamic_caps_only_the_middle() -> None:
    steps = plan("dynamic-mid").steps
    assert [w for _, w in steps] == [TDP_W, 900, 600, 300, 900, 600, 300, TDP_W]
    rec = shipped("dynamic-mid")
    first_300, second_300 = steps[3][0], steps[6][0]
    capped = _mean_kw(rec, first_300 + 2, first_300 + 9)
    assert capped < 0.7 * _mean_kw(rec, steps[-1][0] + 15, steps[-1][0] + 40)
    assert _mean_kw(rec, second_300 + 2, second_300 + 9) < 0.7 * _mean_kw(
        rec, steps[1][0] - 25, steps[1][0] - 5)


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="unknown scenario"):
        synthesize("nope")
    with pytest.raises(InputError, match="positive"):
        synthesize("dynamic", seconds=0)


def test_a_shorter_run_is_a_prefix() -> None:
    short: list[Cycle] = list(synthesize("static-300", seconds=3))
    whole = synthesize("static-300")
    assert [next(whole) for _ in short] == short
