"""How a node's power draw looks at the rack PDU inlet: three phases, one Karman stream each.

Shared by the live sim stream and the synthesizer, so that a GPU cap change
shows up as a step in facility power with believable electrical readings. The
model, step by step (datasets/README.md explains each choice):

1. The node's DC load (GPUs + host) is carried by six PSUs, two per phase, with
   a fixed, slight imbalance between the phases.
2. PSU losses = fixed + proportional + resistive (I²R) terms, so efficiency
   rises from ~89 % at 10 % load to ~95 % at half load and eases off at full load.
3. Current distortion (THD) of the PFC stage falls with load, and the PSUs' EMI
   filter capacitors draw a constant leading current; reactive power is the
   non-active power sqrt(S² - P²), so power factor and Q/P depend on load.
4. Each phase is fed from a source voltage (~121.5 V, wandering slowly with the
   building's other loads) through the feed's impedance (transformer, feeder,
   whip): the voltage sags as the node's current rises.
5. The meter measures each AC cycle with small noise on V, I and P and derives
   S = V·I, PF = P/S and Q; DC offsets are a small sensor bias plus drift.

Stream k (`threephase/karman1..3`) is phase A, B, C; phase_b repeats phase_a, as
the reference replay fills it (karman-wire.md, phase semantics).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from spark_slurm.karman.schema import Cycle, PhaseReading, StreamReading

STREAM_NAMES = ("threephase/karman1", "threephase/karman2", "threephase/karman3")
LINE_HZ = 60.0
_OMEGA = 2 * math.pi * LINE_HZ


@dataclass(frozen=True, slots=True)
class Electrical:
    """Fixed electrical parameters of the node's PSUs and its feed (per phase)."""

    psus_per_phase: int = 2
    psu_rating_w: float = 3300.0
    loss_fixed_w: float = 30.0  # per PSU: controller, fans, switching at zero load
    loss_proportional: float = 0.02
    loss_resistive_per_w: float = 0.8e-5  # I²R: loss = k·P² per PSU
    thd_floor: float = 0.12  # current THD at high load
    thd_light: float = 0.40  # extra THD as load goes to zero ...
    thd_knee: float = 0.10  # ... falling off over this load fraction
    emi_capacitance_f: float = 6e-6  # per PSU, X capacitors across the line
    source_v: tuple[float, float, float] = (121.6, 121.9, 121.3)
    feed_ohm: float = 0.055  # resistance: transformer + feeder + PDU whip
    feed_reactance_ohm: float = 0.025
    phase_share: tuple[float, float, float] = (0.3382, 0.3291, 0.3327)


def psu_loss_w(elec: Electrical, dc_w: float) -> float:
    """Losses of one phase's PSUs carrying dc_w between them (step 2)."""
    n = elec.psus_per_phase
    per = dc_w / n
    return n * (elec.loss_fixed_w + elec.loss_proportional * per
                + elec.loss_resistive_per_w * per * per)


def current_thd(elec: Electrical, dc_w: float) -> float:
    """Current total harmonic distortion at a phase's load (step 3)."""
    load = dc_w / (elec.psus_per_phase * elec.psu_rating_w)
    return elec.thd_floor + elec.thd_light * math.exp(-load / elec.thd_knee)


@dataclass
class RackModel:
    """Electrical model of one HGX-class node at a three-phase PDU inlet.

    Stateful: the source voltage and sensor offsets wander from cycle to cycle,
    so use one model per stream. `host_w` is the non-GPU DC load when the caller
    does not give one per cycle (the live sim's fixed host floor).
    """

    host_w: float = 1400.0
    noise: float = 0.0015  # relative noise of the meter's current (and so of real power)
    seed: int = 0
    streams: tuple[str, ...] = STREAM_NAMES
    elec: Electrical = field(default_factory=Electrical)
    _rng: random.Random = field(init=False, repr=False)
    _wander: list[float] = field(init=False, repr=False)
    _dc_v: list[float] = field(init=False, repr=False)
    _dc_a: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)  # noqa: S311 - reproducible noise, not secrets
        self._rng = rng
        self._wander = [0.0, 0.0]  # building-load voltage wander: slow, fast (V)
        self._dc_v = [rng.gauss(0.02, 0.01) for _ in range(3)]
        self._dc_a = [rng.gauss(0.0, 0.004) for _ in range(3)]

    def node_power_w(self, gpu_power_w: float, host_w: float | None = None) -> float:
        """Noise-free wall power of the node (all phases) for a GPU and host DC load."""
        dc = gpu_power_w + (self.host_w if host_w is None else host_w)
        return sum(s * dc + psu_loss_w(self.elec, s * dc) for s in self.elec.phase_share)

    def _step_wander(self, dt_s: float) -> float:
        """Source-voltage offset shared by the phases: a slow and a fast random walk."""
        rng, w = self._rng, self._wander
        slow = math.exp(-dt_s / 90.0)
        w[0] = w[0] * slow + rng.gauss(0.0, 0.45 * math.sqrt(1 - slow * slow))
        fast = math.exp(-dt_s / 2.0)
        w[1] = w[1] * fast + rng.gauss(0.0, 0.06 * math.sqrt(1 - fast * fast))
        return w[0] + w[1]

    def _phase(self, k: int, dc_w: float, wander: float) -> PhaseReading:
        elec, rng = self.elec, self._rng
        real = dc_w + psu_loss_w(elec, dc_w)
        # Non-active power: harmonic currents plus the EMI capacitors' leading current.
        v0 = elec.source_v[k] + wander
        q_cap = v0 * v0 * _OMEGA * elec.emi_capacitance_f * elec.psus_per_phase
        q_dist = real * current_thd(elec, dc_w)
        # Constant-power load behind the feed: V = V0 - (P·R - Qc·X) / V, solved for V.
        drop = real * elec.feed_ohm - q_cap * elec.feed_reactance_ohm
        volts = (v0 + math.sqrt(max(v0 * v0 - 4 * drop, 0.0))) / 2
        apparent = math.sqrt(real * real + q_dist * q_dist + q_cap * q_cap)
        amps = apparent / volts
        # The meter: V and I from the same samples as P, so their errors carry into P
        # (PF stays steady); S, PF and Q derived from them as a meter does.
        v_m = volts + rng.gauss(0.0, 0.02)
        gain = 1 + rng.gauss(0.0, self.noise)
        i_m = amps * gain
        p_m = real * gain * (v_m / volts) * (1 + rng.gauss(0.0, 0.0002))
        s_m = v_m * i_m
        p_m = min(p_m, s_m)
        self._dc_v[k] += rng.gauss(0.0, 0.0004)
        self._dc_a[k] += rng.gauss(0.0, 0.0002)
        return PhaseReading(
            real_power_w=p_m, apparent_power_va=s_m,
            reactive_power_var=math.sqrt(max(0.0, s_m * s_m - p_m * p_m)),
            power_factor=p_m / s_m if s_m > 0 else 1.0, voltage_rms=v_m,
            voltage_dc_offset=self._dc_v[k] + rng.gauss(0.0, 0.003),
            current_rms=i_m,
            current_dc_offset=self._dc_a[k] + 0.0004 * amps + rng.gauss(0.0, 0.002),
        )

    def cycle(self, time_ns: int, seq: int | None, gpu_power_w: float,
              host_w: float | None = None, dt_s: float = 1 / LINE_HZ) -> Cycle:
        """One AC cycle's readings for every phase, `dt_s` after the previous one."""
        dc = gpu_power_w + (self.host_w if host_w is None else host_w)
        wander = self._step_wander(dt_s)
        readings = []
        for k, name in enumerate(self.streams):
            reading = self._phase(k % 3, dc * self.elec.phase_share[k % 3], wander)
            readings.append(StreamReading(name, reading, reading))
        return Cycle(time_ns, seq, tuple(readings))
