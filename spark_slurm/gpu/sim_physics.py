"""Physics of a simulated GPU, in closed form so any process can evaluate it lazily.

Between two stored events the inputs (utilisation, enforced cap, active faults)
are constant, so power, temperature and energy at any later instant follow
exactly from the last stored state: power approaches min(demand, regulated cap)
with a first-order lag, temperature approaches ambient + R·power (+ a thermal
spike) with its own, slower lag, and energy is the exact integral of power.
Fault expiries split the interval into segments with constant inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from spark_slurm.errors import InputError
from spark_slurm.gpu.backend import (
    REASON_GPU_IDLE,
    REASON_HW_SLOWDOWN,
    REASON_HW_THERMAL,
    REASON_SW_POWER_CAP,
    REASON_SW_THERMAL,
)

FAULT_KINDS = ("driver-crash", "silent-mismatch", "no-permission", "thermal-spike")
NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class SimModel:
    """A GPU model's constraints and thermal/power character."""

    name: str
    min_mw: int
    max_mw: int
    default_mw: int
    idle_mw: int
    peak_mw: int  # draw at 100 % utilisation when uncapped
    ambient_mc: int = 30_000
    r_mc_per_w: int = 50  # steady-state temperature rise per watt (m°C/W)
    tau_power_s: float = 0.2
    tau_temp_s: float = 5.0
    regulation: float = 0.98  # a capped GPU settles this fraction under its cap
    slowdown_mc: int = 87_000  # software thermal slowdown threshold
    hw_slowdown_mc: int = 95_000
    spike_mc: int = 30_000  # extra heating during a thermal-spike fault

    def check(self) -> None:
        """Refuse constraints a real device could not have."""
        if not 0 < self.min_mw <= self.default_mw <= self.max_mw:
            raise InputError(
                f"model {self.name}: need 0 < min ({self.min_mw // 1000} W) <= default "
                f"({self.default_mw // 1000} W) <= max ({self.max_mw // 1000} W)")
        if not 0 <= self.idle_mw <= self.peak_mw:
            raise InputError(f"model {self.name}: need 0 <= idle power <= peak power")
        if self.tau_power_s <= 0 or self.tau_temp_s <= 0 or math.isclose(
                self.tau_power_s, self.tau_temp_s):
            raise InputError(f"model {self.name}: time constants must be positive and differ")


MODELS: dict[str, SimModel] = {
    "b200": SimModel("NVIDIA B200", 200_000, 1_000_000, 1_000_000, 140_000, 1_000_000,
                     r_mc_per_w=50),
    "h100": SimModel("NVIDIA H100 80GB HBM3", 200_000, 700_000, 700_000, 70_000, 700_000,
                     r_mc_per_w=65),
    "a100": SimModel("NVIDIA A100-SXM4-80GB", 100_000, 400_000, 400_000, 50_000, 400_000,
                     r_mc_per_w=110),
}


def model_named(name: str, **overrides: int | float) -> SimModel:
    """A built-in model with optional overrides (e.g. max_mw), validated."""
    base = MODELS.get(name.lower())
    if base is None:
        raise InputError(f"unknown GPU model {name!r} (choose from {', '.join(MODELS)})")
    model = replace(base, **overrides)  # type: ignore[arg-type]
    model.check()
    return model


@dataclass(frozen=True, slots=True)
class Fault:
    """An injected fault active in [start_ns, end_ns); end None means until cleared."""

    kind: str
    start_ns: int
    end_ns: int | None
    held_mw: int = 0  # silent-mismatch: the enforced limit that stays put

    def active(self, t_ns: int) -> bool:
        return self.start_ns <= t_ns and (self.end_ns is None or t_ns < self.end_ns)


@dataclass(frozen=True, slots=True)
class GpuState:
    """Everything that changes about one simulated GPU, as of `t_ns`."""

    t_ns: int
    power_mw: float
    temp_mc: float
    energy_mj: float
    requested_mw: int
    util: float
    energy_epoch: int = 0
    persistence: bool = True
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    def fault(self, kind: str, t_ns: int | None = None) -> Fault | None:
        """The active fault of that kind at t (default: the state's own time)."""
        when = self.t_ns if t_ns is None else t_ns
        for f in self.faults:
            if f.kind == kind and f.active(when):
                return f
        return None

    def enforced_mw(self) -> int:
        """The cap the firmware enforces: the request, unless a mismatch holds it."""
        held = self.fault("silent-mismatch")
        return held.held_mw if held is not None else self.requested_mw


def initial_state(model: SimModel, t_ns: int) -> GpuState:
    """An idle GPU at thermal equilibrium with the default limit."""
    return GpuState(t_ns=t_ns, power_mw=float(model.idle_mw),
                    temp_mc=float(model.ambient_mc + model.r_mc_per_w * model.idle_mw / 1000),
                    energy_mj=0.0, requested_mw=model.default_mw, util=0.0)


def demand_mw(model: SimModel, util: float) -> float:
    """What the workload would draw with no cap."""
    return model.idle_mw + util * (model.peak_mw - model.idle_mw)


def target_power_mw(model: SimModel, state: GpuState) -> float:
    """Where power settles: the demand, or just under the enforced cap when that bites."""
    demand = demand_mw(model, state.util)
    cap = state.enforced_mw()
    if demand > cap:
        return cap * model.regulation
    return demand


def _segment(model: SimModel, s: GpuState, t_ns: int) -> GpuState:
    """Advance with constant inputs (exact solution of the two cascaded lags)."""
    dt = (t_ns - s.t_ns) / NS
    if dt <= 0:
        return s
    tp, tt = model.tau_power_s, model.tau_temp_s
    p_inf = target_power_mw(model, s)
    d = s.power_mw - p_inf
    spike = model.spike_mc if s.fault("thermal-spike") is not None else 0
    r = model.r_mc_per_w / 1000  # m°C per mW
    t_inf = model.ambient_mc + r * p_inf + spike
    c = r * d * tp / (tp - tt)
    ep, et = math.exp(-dt / tp), math.exp(-dt / tt)
    power = p_inf + d * ep
    temp = t_inf + c * ep + (s.temp_mc - t_inf - c) * et
    energy = s.energy_mj + (p_inf * dt + d * tp * (1 - ep))  # mW·s == mJ
    # Built directly: `replace` re-walks the fields and costs more than the physics here.
    return GpuState(t_ns, power, temp, energy, s.requested_mw, s.util, s.energy_epoch,
                    s.persistence, s.faults)


def evolve(model: SimModel, s: GpuState, t_ns: int) -> GpuState:
    """The state at t_ns, splitting at fault expiries; expired faults are dropped."""
    if t_ns <= s.t_ns:
        return s
    ends = sorted({f.end_ns for f in s.faults if f.end_ns is not None and s.t_ns < f.end_ns < t_ns})
    for end in ends:
        s = _segment(model, s, end)
    s = _segment(model, s, t_ns)
    live = tuple(f for f in s.faults if f.end_ns is None or f.end_ns > t_ns)
    return s if live == s.faults else replace(s, faults=live)


def reasons(model: SimModel, s: GpuState) -> int:
    """Clock-event bits NVML would report in this state."""
    mask = 0
    if s.util <= 0.0:
        mask |= REASON_GPU_IDLE
    if demand_mw(model, s.util) > s.enforced_mw():
        mask |= REASON_SW_POWER_CAP
    if s.temp_mc >= model.slowdown_mc:
        mask |= REASON_SW_THERMAL
    if s.temp_mc >= model.hw_slowdown_mc:
        mask |= REASON_HW_THERMAL | REASON_HW_SLOWDOWN
    return mask
