"""How a node's power draw looks at the rack PDU: three meters, two phases each.

Used by both the live sim stream and the synthesizer so that a GPU cap change
shows up as a step in the facility power with believable electrical readings.
Node power = host idle floor + GPU power / PSU efficiency, split over the
meters with a fixed, slight imbalance, at ~120 V RMS and a power factor near
0.98, with small seeded noise on every quantity.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from spark_slurm.karman.schema import Cycle, PhaseReading, StreamReading

STREAM_NAMES = ("threephase/karman1", "threephase/karman2", "threephase/karman3")
# Fixed share of node power per (stream, phase): PSUs never split load perfectly.
_SHARES = (0.171, 0.165, 0.168, 0.162, 0.170, 0.164)


@dataclass
class RackModel:
    """Electrical model of one HGX-class node behind three two-phase meters."""

    idle_w: float = 1200.0
    psu_efficiency: float = 0.94
    nominal_v: float = 120.0
    power_factor: float = 0.98
    noise: float = 0.004  # relative noise on power readings
    seed: int = 0
    streams: tuple[str, ...] = STREAM_NAMES
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - reproducible noise, not secrets

    def node_power_w(self, gpu_power_w: float) -> float:
        """Wall power of the node for a given total GPU draw."""
        return self.idle_w + gpu_power_w / self.psu_efficiency

    def _phase(self, watts: float) -> PhaseReading:
        rng = self._rng
        real = max(0.0, watts * (1.0 + rng.gauss(0.0, self.noise)))
        pf = min(0.999, max(0.9, self.power_factor + rng.gauss(0.0, 0.002)))
        volts = self.nominal_v + rng.gauss(0.0, 0.35)
        apparent = real / pf
        reactive = math.sqrt(max(0.0, apparent * apparent - real * real))
        return PhaseReading(
            real_power_w=real, apparent_power_va=apparent, reactive_power_var=reactive,
            power_factor=pf, voltage_rms=volts, voltage_dc_offset=rng.gauss(0.0, 0.02),
            current_rms=apparent / volts, current_dc_offset=rng.gauss(0.0, 0.005),
        )

    def cycle(self, time_ns: int, seq: int | None, gpu_power_w: float) -> Cycle:
        """One AC cycle's readings for every meter."""
        node = self.node_power_w(gpu_power_w)
        scale = 1.0 / sum(_SHARES[: 2 * len(self.streams)])
        readings = []
        for k, name in enumerate(self.streams):
            a = self._phase(node * _SHARES[(2 * k) % 6] * scale)
            b = self._phase(node * _SHARES[(2 * k + 1) % 6] * scale)
            readings.append(StreamReading(name, a, b))
        return Cycle(time_ns, seq, tuple(readings))
