"""Synthetic Karman recordings of an 8 × B200 server serving vLLM inference.

The real reference recordings cannot be redistributed, so these reproduce their
four scenarios from a documented, seeded physical model (datasets/README.md
walks through every step):

- the run: idle lead-in, the 1,000 requests/minute trace (workload.Engine), the
  drain until every request is answered, an idle tail; its length follows from
  how fast the capped GPUs get through the work;
- the caps: set by an operator's script with nvidia-smi, so steps last ~10 s
  plus the tool's own time, and each GPU receives its cap a few tens of
  milliseconds after the previous one;
- a GPU: draws idle power plus its dynamic range × the engine's compute
  intensity; the driver's power limiter pulls the draw down to the cap within
  a few hundred milliseconds (brief overshoot above the limit on load spikes),
  and a throttled GPU runs slower, which feeds back into the engine;
- the host: CPUs, memory, NICs, NVSwitch baseboard, and fans whose speed follows
  the GPUs' heat with a 25 s lag (fan power goes with speed cubed);
- the feed and meter: `rack.RackModel`;
- the stream: AC cycles at the grid's slowly wandering frequency (~60 Hz),
  timestamped in whole milliseconds with the recorder's jitter, and now and
  then a cycle the recorder missed (its sequence number is skipped).

The same scenario and seed always give the same cycles, and a shorter run is
an exact prefix of the whole one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spark_slurm.errors import InputError
from spark_slurm.karman.csvfile import write_recording
from spark_slurm.karman.rack import LINE_HZ, RackModel
from spark_slurm.karman.schema import Cycle
from spark_slurm.karman.workload import Engine, Trace

GPUS = 8
TDP_W = 1000.0
IDLE_GPU_W = 165.0
DYNAMIC_GPU_W = 1000.0  # idle + this = what a GPU would draw flat out, above its TDP
DYNAMIC_STEPS_W = (900.0, 600.0, 300.0)
STEP_S = 10.0
LIMITER_S = 0.12  # power-limiter time constant
DEMAND_S = 0.03  # VRM and board smoothing of demand changes
PERF_EXPONENT = 0.3  # speed ∝ (dynamic power) ** 0.3: memory-bound work needs few clocks
HOST_IDLE_W = 1400.0
HOST_CPU_W = 260.0
FAN_MAX_W = 3000.0
FAN_LAG_S = 25.0
DROP_PROBABILITY = 4e-5


@dataclass(frozen=True, slots=True)
class Scenario:
    """One reference scenario and the recording that reproduces it."""

    name: str
    file: str
    caps: str  # none | static | dynamic | dynamic-mid
    trace_s: float
    seed: int
    start_ms: int  # wall time of the first cycle (a plausible lab session)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("no-cap", "sample1-b200-no-powercap.csv", "none", 180.0, 1, 1_757_934_131_000),
    Scenario("static-300", "sample2-b200-static-powercap.csv", "static", 180.0, 2,
             1_757_935_342_000),
    Scenario("dynamic", "sample3-b200-dynamic-powercap.csv", "dynamic", 180.0, 3,
             1_757_937_018_000),
    Scenario("dynamic-mid", "sample4-b200-partial-dynamic-powercap.csv", "dynamic-mid",
             240.0, 4, 1_757_938_655_000),
)}
DEFAULT_SEEDS = {name: s.seed for name, s in SCENARIOS.items()}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InputError(f"unknown scenario {name!r} "
                         f"(choose from {', '.join(SCENARIOS)})") from None


def cap_steps(sc: Scenario, rng: random.Random, trace_start: float,
              horizon_s: float) -> list[tuple[float, float]]:
    """(time, per-GPU cap W) changes as the operator's script made them, in run time."""
    if sc.caps == "none":
        return [(0.0, TDP_W)]
    if sc.caps == "static":
        return [(0.0, 300.0)]  # set before the recording started
    steps: list[tuple[float, float]] = [(0.0, TDP_W)]
    if sc.caps == "dynamic":
        t, count = trace_start - rng.uniform(1.0, 3.0), None
    else:  # two passes through the steps, centred in the trace
        t, count = trace_start + sc.trace_s / 2 - 1.5 * STEP_S * 2, 6
    k = 0
    while t < horizon_s and (count is None or k < count):
        steps.append((t, DYNAMIC_STEPS_W[k % 3]))
        # `sleep 10` plus eight nvidia-smi calls
        t += STEP_S + 0.25 + abs(rng.gauss(0.15, 0.12))
        k += 1
    if count is not None:
        steps.append((t, TDP_W))  # the script puts the default limit back
    return steps


class _Gpu:
    """One B200: demand from the engine's intensity, held to its limit by the driver."""

    def __init__(self, rng: random.Random, index: int) -> None:
        self.idle = IDLE_GPU_W + rng.gauss(0.0, 6.0)
        self.span = DYNAMIC_GPU_W * (1 + rng.gauss(0.0, 0.025))
        self.delay = 0.035 * index + abs(rng.gauss(0.0, 0.004))  # nvidia-smi goes in order
        self.smooth = self.idle
        self.throttle = 1.0  # share of the demanded dynamic power the limiter lets through
        self.perf = 1.0

    def draw(self, rng: random.Random, intensity: float, limit: float, dt: float) -> float:
        if intensity > 0:
            intensity = min(1.0, max(0.0, intensity + rng.gauss(0.0, 0.045)))
        demand = self.idle + self.span * intensity + rng.gauss(0.0, 2.0)
        self.smooth += (demand - self.smooth) * (1 - math.exp(-dt / DEMAND_S))
        busy = max(0.0, self.smooth - self.idle)
        # The limiter scales the clocks (the busy part) towards what the limit allows.
        allowed = 1.0 if busy <= 0 else min(1.0, max(0.0, limit - self.idle) / busy)
        self.throttle += (allowed - self.throttle) * (1 - math.exp(-dt / LIMITER_S))
        self.perf = max(0.05, self.throttle) ** PERF_EXPONENT
        return self.idle + busy * self.throttle + (self.smooth - self.idle - busy)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the operator did: idle before the client starts and after it ends, and the caps."""

    lead_s: float
    tail_s: float
    steps: tuple[tuple[float, float], ...]  # (run time s, per-GPU cap W)


def _plan(sc: Scenario, rng: random.Random) -> Plan:
    lead = rng.uniform(8.0, 25.0)
    tail = rng.uniform(10.0, 20.0)
    return Plan(lead, tail, tuple(cap_steps(sc, rng, lead, 3600.0)))


def plan(name: str, seed: int | None = None) -> Plan:
    """The plan the scenario's recording was made with (same seed, same draws)."""
    sc = scenario(name)
    return _plan(sc, random.Random(sc.seed if seed is None else seed))  # noqa: S311


def _cycles(sc: Scenario, seed: int) -> Iterator[Cycle]:
    rng = random.Random(seed)  # noqa: S311 - reproducible physics, not secrets
    rack = RackModel(seed=seed + 1_000_003)
    run = _plan(sc, rng)
    lead, tail, steps = run.lead_s, run.tail_s, list(run.steps)
    arrivals = random.Random(seed + 17)  # noqa: S311 - its own stream: the client's requests
    engine = Engine(Trace(duration_s=sc.trace_s), arrivals, start_s=lead)
    gpus = [_Gpu(rng, g) for g in range(GPUS)]
    seq = rng.randrange(10_000_000, 900_000_000)  # the device has been up a while
    t, freq, last_ms, perf = 0.0, LINE_HZ + rng.gauss(0.0, 0.01), -1, 1.0
    fan = 0.32
    cpu = 0.0
    end: float | None = None
    while end is None or t < end:
        dt = 1.0 / freq
        intensity = engine.step(t, dt, perf)
        total = 0.0
        for gpu in gpus:
            limit = _limit_at(steps, t - gpu.delay)
            total += gpu.draw(rng, intensity, limit, dt)
        perf = min(g.perf for g in gpus)  # tensor parallel: the slowest GPU sets the pace
        cpu += ((1.0 if intensity > 0 else 0.15) - cpu) * dt / 2.0
        heat = min(1.0, total / (GPUS * TDP_W * 0.85))
        fan += (0.32 + 0.68 * heat ** 1.3 - fan) * dt / FAN_LAG_S
        host = HOST_IDLE_W + HOST_CPU_W * cpu + FAN_MAX_W * fan ** 3
        stamp = t + min(0.0015, max(-0.0015, rng.gauss(0.0, 0.0004)))
        t_ms = max(last_ms + 1, sc.start_ms + math.floor(stamp * 1000))
        cycle = rack.cycle(t_ms * 1_000_000, seq, total, host, dt)
        if rng.random() >= DROP_PROBABILITY:
            last_ms = t_ms
            yield cycle
        seq += 1
        t += dt
        # The grid's frequency wanders around 60 Hz (Ornstein-Uhlenbeck, 30 s).
        freq += (LINE_HZ - freq) * dt / 30.0 + rng.gauss(0.0, 0.012 * math.sqrt(2 * dt / 30.0))
        if end is None and engine.finished:
            end = t + tail


def _limit_at(steps: list[tuple[float, float]], t: float) -> float:
    limit = steps[0][1]
    for when, watts in steps:
        if when > t:
            break
        limit = watts
    return limit


def synthesize(name: str, seconds: float | None = None,
               seed: int | None = None) -> Iterator[Cycle]:
    """The scenario's cycles (all of the run, or its first `seconds`); arguments checked now."""
    sc = scenario(name)
    if seconds is not None and not seconds > 0:
        raise InputError(f"--seconds must be positive, not {seconds}")
    cycles = _cycles(sc, sc.seed if seed is None else seed)
    if seconds is None:
        return cycles
    stop_ms = sc.start_ms + seconds * 1000
    return _until(cycles, lambda c: c.time_ns / 1e6 >= stop_ms)


def _until(cycles: Iterator[Cycle], done: Callable[[Cycle], bool]) -> Iterator[Cycle]:
    for cycle in cycles:
        if done(cycle):
            return
        yield cycle


def write_scenario(name: str, out: Path, *, seconds: float | None = None,
                   seed: int | None = None) -> int:
    """Synthesize a scenario into a reference-layout CSV (gzip'd for .gz); returns rows."""
    return write_recording(out, synthesize(name, seconds, seed))
