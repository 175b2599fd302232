"""What the rack should draw under a set of GPU caps, and how the Karman stories judge it.

The demo's facility stream is one node's rack PDU inlet (karman1..3 = phases A, B,
C; rack power = the sum of their phase_a), synthesised by `sparkctl karman sim`
from the sim GPUs' real draw through `karman.rack.RackModel` (PSU losses, a fixed
1.4 kW host floor). A GPU running flat out draws its TDP or, under a lower cap,
the cap; an idle one draws its idle power. So what the caps allow the rack to
draw is known before the run: wall(Σ GPU draw + host), and the stories assert
the measured rack against it:

- a level (the mean over a cap step, once settled) lies in [−LEVEL_BELOW,
  +LEVEL_ABOVE] of the prediction. Below: a capped GPU's limiter settles a little
  under its cap (≤ 2 % on the sim, as on real boards), and a step is left out of
  the mean for SETTLE_S, 5.5 × the sim's 0.2 s power lag, so what remains of a
  1000 → 300 W step is < 0.5 % of the rack. Above: only the meter's noise
  (0.15 % gain noise per phase and cycle, ~0.1 % on the three-phase sum), so
  LEVEL_ABOVE is 15 σ of one cycle. One GPU 160 W past its cap already moves an
  8-GPU rack at 300 W per GPU out of the band.
- every settled cycle of a step is at most the ceiling + LEVEL_ABOVE: the caps
  hold the rack, not only on average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from spark_slurm.gpu.sim_physics import model_named
from spark_slurm.karman.rack import RackModel

LEVEL_BELOW = 0.04
LEVEL_ABOVE = 0.015
SETTLE_S = 1.1           # 5.5 power time constants of the sim GPU (0.2 s), + one 0.1 s read
MIN_CYCLES = 60          # a level needs at least a second of AC cycles
HOST_W = RackModel().host_w  # the live sim stream's host floor (CPUs, NICs, fans, ...)


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """What a GPU draws idle and flat out (its TDP, the default limit when uncapped)."""

    idle_w: float
    full_w: float

    @classmethod
    def of(cls, model: str) -> GpuSpec:
        m = model_named(model)
        return cls(m.idle_mw / 1000, m.peak_mw / 1000)

    def draw_w(self, cap_w: float | None, loaded: bool) -> float:
        """Steady draw: idle, or flat out held to the cap (None: uncapped, the TDP)."""
        if not loaded:
            return self.idle_w
        return self.full_w if cap_w is None else min(float(cap_w), self.full_w)


def rack_w(gpu_w: Sequence[float], host_w: float = HOST_W) -> float:
    """Noise-free three-phase wall power of the node for these GPU draws."""
    return RackModel(host_w=host_w).node_power_w(sum(gpu_w))


def predicted_rack_w(spec: GpuSpec, gpus: int, loaded: Sequence[int], cap_w: float | None,
                     host_w: float = HOST_W) -> float:
    """The rack when the GPUs in `loaded` run flat out under `cap_w` and the rest idle."""
    busy = set(loaded)
    return rack_w([spec.draw_w(cap_w, i in busy) for i in range(gpus)], host_w)


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of a run with one cap on the loaded GPUs (wall-clock ns)."""

    label: str
    cap_w: float | None          # None: uncapped (or idle, with loaded False)
    loaded: bool
    start_ns: int
    end_ns: int


@dataclass(frozen=True, slots=True)
class Level:
    """The rack over a segment, its first SETTLE_S left out."""

    segment: Segment
    mean_w: float
    peak_w: float
    cycles: int


def levels(series: Sequence[tuple[int, float]], segments: Sequence[Segment],
           settle_s: float = SETTLE_S) -> list[Level]:
    """Mean and peak rack power of each segment from (time_ns, watts) cycles."""
    out = []
    for seg in segments:
        start = seg.start_ns + int(settle_s * 1e9)
        values = [w for t, w in series if start <= t < seg.end_ns]
        out.append(Level(seg, sum(values) / len(values) if values else math.nan,
                         max(values) if values else math.nan, len(values)))
    return out


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    detail: str


def judge_level(level: Level, predicted_w: float, below: float = LEVEL_BELOW,
                above: float = LEVEL_ABOVE, min_cycles: int = MIN_CYCLES) -> Verdict:
    """The segment's mean within [−below, +above] of the prediction, and no settled cycle
    above the prediction + `above` (the caps' ceiling holds cycle by cycle)."""
    if level.cycles < min_cycles:
        return Verdict(False, f"{level.segment.label}: only {level.cycles} rack cycles "
                              f"(need {min_cycles})")
    low, high = predicted_w * (1 - below), predicted_w * (1 + above)
    off = (level.mean_w / predicted_w - 1) * 100
    ok = low <= level.mean_w <= high and level.peak_w <= high
    return Verdict(ok, f"rack {level.mean_w / 1000:.2f} kW (peak {level.peak_w / 1000:.2f}) "
                       f"vs predicted {predicted_w / 1000:.2f} kW ({off:+.1f} %, allowed "
                       f"−{below:.0%}/+{above:.1%}) over {level.cycles} cycles")


def cut(level_w: float, uncapped_w: float) -> float:
    """The share of the uncapped rack power a cap takes away."""
    return 1 - level_w / uncapped_w
