"""The Karman stories' rack model and tolerance, against the sim GPUs' own physics.

The rack series here is made the way the demo's stream makes it: the sim fleet's
real draw (`sim_gpu_power`, on a manual clock) through `RackModel.cycle`, 60 Hz,
meter noise and all. The band must pass an honest run and fail a GPU that does
not hold its cap, a rack above the caps' ceiling and too short a measurement.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.demo import rackpower
from spark_slurm.demo.rackpower import GpuSpec, Level, Segment, judge_level, levels
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.karman.publisher import sim_gpu_power
from spark_slurm.karman.rack import RackModel

B200 = GpuSpec.of("b200")
S = 1_000_000_000


class Run:
    """8 sim B200s, a manual clock and the rack stream their draw makes."""

    def __init__(self, root: Path, seed: int = 0) -> None:
        self.clock = ManualClock()
        self.fleet = SimFleet.init(root, 8, "b200", clock=self.clock)
        self.power = sim_gpu_power(root, self.clock)
        self.rack = RackModel(seed=seed)
        self.series: list[tuple[int, float]] = []

    def cap(self, watts: int, gpus: range = range(8)) -> None:
        for g in gpus:
            self.fleet.set_limit(g, watts * 1000)

    def run(self, seconds: float) -> tuple[int, int]:
        start = self.clock.now_ns()
        for _ in range(round(seconds * 60)):
            self.clock.advance(1 / 60)
            now = self.clock.now_ns()
            cycle = self.rack.cycle(now, None, self.power() / 1000)
            self.series.append((now, cycle.real_power_w()))
        return start, self.clock.now_ns()


def test_gpu_draw_is_idle_the_cap_or_the_tdp() -> None:
    assert (B200.idle_w, B200.full_w) == (140.0, 1000.0)
    assert B200.draw_w(300, loaded=True) == 300
    assert B200.draw_w(None, loaded=True) == 1000      # uncapped: the TDP
    assert B200.draw_w(1200, loaded=True) == 1000      # a cap above the TDP does not bite
    assert B200.draw_w(300, loaded=False) == 140


def test_prediction_counts_the_idle_gpus_and_the_psu_losses() -> None:
    half = rackpower.predicted_rack_w(B200, 8, range(4), 300)
    assert half == pytest.approx(rackpower.rack_w([300] * 4 + [140] * 4))
    dc = 4 * 300 + 4 * 140 + rackpower.HOST_W
    assert dc * 1.03 < half < dc * 1.12                 # PSUs are 89-95 % efficient
    steps = [rackpower.predicted_rack_w(B200, 8, range(8), w) for w in (300, 600, 900, None)]
    assert steps == sorted(steps)


def test_an_honest_run_is_inside_the_band_at_every_step(tmp_path: Path) -> None:
    run = Run(tmp_path)
    segments = [Segment("idle", None, False, *run.run(3))]
    run.fleet.set_load(1.0)
    for watts in (1000, 900, 600, 300, 900):
        run.cap(watts)
        segments.append(Segment(f"{watts} W", watts, True, *run.run(5)))
    for level in levels(run.series, segments):
        predicted = rackpower.predicted_rack_w(B200, 8, range(8) if level.segment.loaded
                                               else [], level.segment.cap_w)
        verdict = judge_level(level, predicted)
        assert verdict.ok, verdict.detail
        assert level.cycles == pytest.approx(
            (level.segment.end_ns - level.segment.start_ns) / S * 60 - 66, abs=2)


def test_one_gpu_over_its_cap_fails_the_level(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.fleet.set_load(1.0)
    run.cap(300, range(7))                              # gpu7 keeps its 1,000 W default
    seg = Segment("300 W", 300, True, *run.run(4))
    [level] = levels(run.series, [seg])
    predicted = rackpower.predicted_rack_w(B200, 8, range(8), 300)
    assert not judge_level(level, predicted).ok
    assert level.mean_w > predicted * 1.1               # 700 W of one GPU: ~17 % of the rack


def test_a_single_cycle_above_the_ceiling_fails_even_when_the_mean_is_in() -> None:
    seg = Segment("300 W", 300, True, 0, 10 * S)
    ok = Level(seg, mean_w=4000.0, peak_w=4010.0, cycles=600)
    spike = Level(seg, mean_w=4000.0, peak_w=4000.0 * 1.02, cycles=600)
    assert judge_level(ok, 4000.0).ok
    assert not judge_level(spike, 4000.0).ok


def test_the_band_is_minus_four_plus_one_and_a_half_percent() -> None:
    seg = Segment("x", 300, True, 0, S)

    def at(ratio: float) -> bool:
        return judge_level(Level(seg, 4000.0 * ratio, 4000.0 * ratio, 600), 4000.0).ok

    assert at(0.961) and at(1.0) and at(1.014)
    assert not at(0.959) and not at(1.016)


def test_too_few_cycles_is_a_failure_that_says_so(tmp_path: Path) -> None:
    run = Run(tmp_path)
    seg = Segment("idle", None, False, *run.run(1.5))   # 1.1 s settle leaves ~24 cycles
    [level] = levels(run.series, [seg])
    verdict = judge_level(level, rackpower.predicted_rack_w(B200, 8, [], None))
    assert not verdict.ok and "only" in verdict.detail and "need 60" in verdict.detail
    [empty] = levels([], [seg])
    assert empty.cycles == 0 and math.isnan(empty.mean_w)
    assert not judge_level(empty, 1.0).ok


def test_levels_leave_out_the_settling_time_after_each_change(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.fleet.set_load(1.0)
    t0, _ = run.run(4)
    run.cap(300)
    t1, t2 = run.run(4)
    settled, raw = levels(run.series, [Segment("300 W", 300, True, t1, t2)]), levels(
        run.series, [Segment("300 W", 300, True, t1, t2)], settle_s=0.0)
    predicted = rackpower.predicted_rack_w(B200, 8, range(8), 300)
    assert judge_level(settled[0], predicted).ok
    assert not judge_level(raw[0], predicted).ok        # the 1,000 -> 300 W fall is in it
    assert raw[0].peak_w > predicted * 2 and t0 < t1


def test_cut_is_the_share_the_cap_takes_away() -> None:
    assert rackpower.cut(4000.0, 10000.0) == pytest.approx(0.6)
    assert rackpower.cut(10500.0, 10000.0) == pytest.approx(-0.05)
