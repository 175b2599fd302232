"""A small two-stream cycle whose values the tests can work out by hand."""

from __future__ import annotations

from spark_slurm.karman.schema import Cycle, PhaseReading, StreamReading


def two_stream_cycle(i: int, a_w: float, b_w: float | None,
                     names: tuple[str, str] = ("threephase/karman1", "threephase/karman2")
                     ) -> Cycle:
    """Stream 1 has phase_a (a_w) and, unless b_w is None, phase_b; stream 2 phase_a only."""
    a = PhaseReading(real_power_w=a_w, voltage_rms=120.0 + i, current_rms=a_w / 120,
                     power_factor=0.98, reactive_power_var=a_w / 10)
    b = None if b_w is None else PhaseReading(real_power_w=b_w, voltage_rms=121.0,
                                              reactive_power_var=b_w / 10)
    return Cycle(1_000 + i, i, (StreamReading(names[0], a, b), StreamReading(names[1], a, None)))
