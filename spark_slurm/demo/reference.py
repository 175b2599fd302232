"""The Karman reference recordings, cut into the parts the demo's Karman stories measure.

datasets/sample{1,2,4}-b200-*.csv reproduce the reference lab's no-cap, static
300 W and partial-dynamic runs (datasets/README.md). Each was made from a seeded
plan (`karman.synth.plan`: idle lead-in, the request trace, the cap steps, the
idle tail), so the cap in force at every cycle is known and a run can be cut
exactly where its caps changed. The rack's mean power in each part:

- `idle`: the lead-in, before the client starts (its first and last second left out);
- `loaded`: the run under its one cap (no-cap, static), from 35 s after the client
  starts (its request rate ramps over 30 s) to 5 s before the drain ends;
- `uncapped`, `900 W #1` ... `300 W #2`, `uncapped after` (partial dynamic): the
  uncapped run before the cycles, each cap step with its first 2 s left out
  (the GPUs' limiter and smoothing), and the uncapped run after them.

The demo's node differs from the lab's in two known ways: its sim GPUs run flat
out (the lab's served inference at partial intensity, so a cap bit less), and
its host is a fixed floor (the lab's fans follow the GPUs' heat with a 25 s lag
and do not drop with a cap). So the comparison the stories make is one-sided:
a cap takes at least as large a share of the rack's uncapped power here as in
the reference, within SHAPE_MARGIN.
"""

from __future__ import annotations

import functools
from pathlib import Path

from spark_slurm.errors import InputError
from spark_slurm.karman import synth
from spark_slurm.karman.csvfile import read_recording

SHAPE_MARGIN = 0.05   # the reference's own two passes through its 300 W step differ by 3 points
RAMP_S, STEP_SETTLE_S, EDGE_S = 35.0, 2.0, 5.0


def _mean(series: list[tuple[float, float]], t0: float, t1: float, where: Path) -> float:
    values = [w for t, w in series if t0 <= t < t1]
    if not values:
        raise InputError(f"{where}: no cycles in [{t0:.1f}, {t1:.1f}) s of the run; is it "
                         "the whole reference recording?")
    return sum(values) / len(values)


@functools.lru_cache(maxsize=4)
def reference_levels(scenario: str, datasets: Path) -> dict[str, float]:
    """Mean rack power (W) of each part of a reference run (`karman synth` scenario name)."""
    sc = synth.scenario(scenario)
    path = datasets / sc.file
    rec = read_recording(path)
    start = rec.cycles[0].time_ns
    series = [((c.time_ns - start) / 1e9, c.real_power_w()) for c in rec.cycles]
    plan = synth.plan(scenario)
    drain_end = series[-1][0] - plan.tail_s
    out = {"idle": _mean(series, 1.0, plan.lead_s - 1.0, path)}
    loaded_from = plan.lead_s + RAMP_S
    if sc.caps in ("none", "static"):
        out["loaded"] = _mean(series, loaded_from, drain_end - EDGE_S, path)
        return out
    steps = [t for t, _ in plan.steps[1:]]
    out["uncapped"] = _mean(series, loaded_from, steps[0], path)
    for k, (t, watts) in enumerate(plan.steps[1:-1]):
        label = f"{watts:.0f} W #{k // 3 + 1}"
        out[label] = _mean(series, t + STEP_SETTLE_S, steps[k + 1], path)
    out["uncapped after"] = _mean(series, steps[-1] + STEP_SETTLE_S, drain_end - EDGE_S,
                                   path)
    return out
