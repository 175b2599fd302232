"""Synthetic Karman recordings of an 8 × B200 server serving vLLM inference.

The real reference recordings cannot be redistributed, so these reproduce their
four scenarios from a documented, seeded model (datasets/README.md):

- load: requests per minute ramp from ~250 to ~1,000 over the first 40 s, with a
  slow swell and short bursts; each of two tensor-parallel replicas (GPUs 0-3,
  4-7) sees its own share, so the GPUs are close but never identical;
- a GPU's demand = 140 W idle + 850 W × utilisation, with a few-hertz ripple from
  the prefill/decode mix; its draw follows min(demand, cap) with a 0.25 s lag;
- the node = 1.2 kW host floor + GPU draw / 0.94 PSU efficiency, spread over the
  three two-phase meters by `RackModel`.

The same seed and scenario always give the same cycles, and a shorter run is an
exact prefix of a longer one (every cycle consumes the random streams alike).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from spark_slurm.errors import InputError
from spark_slurm.karman.csvfile import write_recording
from spark_slurm.karman.rack import RackModel
from spark_slurm.karman.schema import Cycle

CYCLE_HZ = 60
START_MS = 1_750_000_000_000  # 2025-06-15T15:06:40Z: a fixed epoch keeps files reproducible
GPUS = 8
IDLE_GPU_W = 140.0
SPAN_GPU_W = 850.0
TDP_W = 1000.0
LAG_S = 0.25
DYNAMIC_STEPS_W = (900.0, 600.0, 300.0)
STEP_S = 10.0
MID_START_S, MID_END_S = 60.0, 120.0  # dynamic-mid: two 30 s cycles in the middle


def _no_cap(t: float) -> float:
    return TDP_W


def _static_300(t: float) -> float:
    return 300.0


def _dynamic(t: float) -> float:
    return DYNAMIC_STEPS_W[int(t // STEP_S) % len(DYNAMIC_STEPS_W)]


def _dynamic_mid(t: float) -> float:
    if MID_START_S <= t < MID_END_S:
        return _dynamic(t - MID_START_S)
    return TDP_W


SCENARIOS: dict[str, Callable[[float], float]] = {
    "no-cap": _no_cap,
    "static-300": _static_300,
    "dynamic": _dynamic,
    "dynamic-mid": _dynamic_mid,
}
DEFAULT_SEEDS = {"no-cap": 1, "static-300": 2, "dynamic": 3, "dynamic-mid": 4}


def cap_schedule(scenario: str) -> Callable[[float], float]:
    """Per-GPU power cap (W) at t seconds into the run."""
    try:
        return SCENARIOS[scenario]
    except KeyError:
        raise InputError(f"unknown scenario {scenario!r} "
                         f"(choose from {', '.join(SCENARIOS)})") from None


def _requests_per_min(t: float, swell_phase: float) -> float:
    ramp = 250.0 + 750.0 * min(1.0, t / 40.0)
    swell = 1.0 + 0.08 * math.sin(2 * math.pi * t / 47.0 + swell_phase)
    return min(1000.0, ramp * swell)


def synthesize(scenario: str, seconds: float = 180.0, seed: int | None = None) -> Iterator[Cycle]:
    """The scenario's cycles at 60 Hz for `seconds` seconds (arguments checked at once)."""
    caps = cap_schedule(scenario)
    if not seconds > 0:
        raise InputError(f"--seconds must be positive, not {seconds}")
    return _cycles(caps, seconds, DEFAULT_SEEDS[scenario] if seed is None else seed)


def _cycles(caps: Callable[[float], float], seconds: float, seed: int) -> Iterator[Cycle]:
    rng = random.Random(seed)  # noqa: S311 - reproducible load, not secrets
    rack = RackModel(seed=seed + 1_000_003)
    swell_phase = rng.uniform(0, 2 * math.pi)
    replica_bias = (rng.uniform(0.95, 1.0), rng.uniform(0.9, 0.97))
    gpu_bias = [rng.uniform(0.97, 1.03) for _ in range(GPUS)]
    burst = [0.0, 0.0]
    draw = [IDLE_GPU_W] * GPUS
    alpha = 1.0 - math.exp(-1.0 / (CYCLE_HZ * LAG_S))
    n = int(seconds * CYCLE_HZ)
    for i in range(n):
        t = i / CYCLE_HZ
        cap = caps(t)
        rpm = _requests_per_min(t, swell_phase)
        ripple = 0.04 * math.sin(2 * math.pi * 2.7 * t) + 0.02 * math.sin(2 * math.pi * 0.9 * t)
        for r in range(2):
            # Bursts: a new one starts now and then and decays over ~1 s.
            kick = rng.random()
            burst[r] = burst[r] * math.exp(-1.0 / CYCLE_HZ) + (0.25 if kick < 0.004 else 0.0)
        total = 0.0
        for g in range(GPUS):
            r = g // 4
            util = min(1.0, (rpm / 1000.0) * replica_bias[r] * 0.92 + burst[r] + ripple
                       + rng.gauss(0.0, 0.015))
            demand = (IDLE_GPU_W + SPAN_GPU_W * max(0.0, util)) * gpu_bias[g]
            target = min(demand, cap)
            draw[g] += alpha * (target - draw[g])
            total += draw[g]
        time_ns = (START_MS + i * 1000 // CYCLE_HZ) * 1_000_000
        yield rack.cycle(time_ns, i, total)


def write_scenario(scenario: str, out: Path, *, seconds: float = 180.0,
                   seed: int | None = None) -> int:
    """Synthesize a scenario into a CSV (gzip'd when `out` ends in .gz); returns rows."""
    cycles = synthesize(scenario, seconds, seed)
    return write_recording(out, cycles)
