"""The exporter's statistics: the reference families and ours, over the last N messages."""

from __future__ import annotations

from spark_slurm.karman.exporter import reference_stats, window_stats
from spark_slurm.karman.schema import TWO_PHASE_PER_STREAM, Cycle
from tests.unit.karman.cycles import two_stream_cycle


def _cycle(i: int, a_w: float, b_w: float | None) -> Cycle:
    return two_stream_cycle(i, a_w, b_w, ("k1", "k2"))


CYCLES = [_cycle(0, 100.0, 50.0), _cycle(1, 300.0, 10.0), _cycle(2, 200.0, None)]


def test_reference_families_per_stream_phase_and_three_phase() -> None:
    stats = reference_stats(CYCLES, "cycle-aligned")
    want = {"latest": 200.0, "peak": 300.0, "trough": 100.0, "average": 200.0}
    assert stats[("real_power", "k1", "a")] == want
    assert stats[("active_power", "k1", "a")] == want  # a copy of real power
    assert stats[("rms_voltage", "k2", "a")]["latest"] == 122.0
    assert stats[("real_power", "k1", "b")]["average"] == 30.0  # two cycles had phase_b
    assert ("real_power", "k2", "b") not in stats  # never had one
    assert ("dc_offset_current", "k1", "a") not in stats  # never sent
    # three-phase: per message, Σ over streams of the same phase, labelled with the topic
    assert stats[("real_power_three_phase", "cycle-aligned", "a")] == {
        "latest": 400.0, "peak": 600.0, "trough": 200.0, "average": 400.0}
    assert stats[("real_power_three_phase", "cycle-aligned", "b")]["latest"] == 10.0
    assert stats[("reactive_power_three_phase", "cycle-aligned", "a")]["peak"] == 60.0


def test_our_families_follow_the_phase_semantics() -> None:
    stats = window_stats(CYCLES)
    assert stats[("real_power_w", "k1", "phase_a")]["latest"] == 200.0
    assert stats[("real_power_w", "k1", "phase_b")]["average"] == 30.0
    # streams are phases: a stream's total is its phase_a; the rack adds the streams
    assert stats[("real_power_w", "k1", "sum")]["peak"] == 300.0
    assert stats[("real_power_w", "rack", "sum")]["peak"] == 600.0
    two = window_stats(CYCLES, TWO_PHASE_PER_STREAM)
    assert two[("real_power_w", "k1", "sum")] == {
        "latest": 200.0, "peak": 310.0, "trough": 150.0, "average": 220.0}
    assert two[("real_power_w", "rack", "sum")]["peak"] == 610.0
    assert ("voltage_rms", "k1", "sum") not in stats  # voltages do not add up
