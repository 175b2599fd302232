"""The vLLM inference workload behind the synthetic recordings, as a per-cycle engine model.

One tensor-parallel replica spans all eight GPUs (a 480B-parameter MoE model
needs them all), so the GPUs run in lockstep and see one compute intensity.
The model, step by step (datasets/README.md):

1. Requests arrive as a Poisson process whose rate ramps up to the trace's peak
   (1,000 requests/minute) and then wanders a little; prompt and output lengths
   are log-normal (code-assistant prompts are long, answers shorter).
2. Continuous batching as vLLM does it: up to 256 running sequences; each engine
   step decodes one token for every running sequence and prefills a chunk of
   waiting prompts within an 8,192-token budget.
3. A step takes a fixed overhead (kernel launches, NVLink all-reduce) plus a
   per-sequence decode cost plus the prefill chunk at the prefill rate. Under a
   power cap the GPUs' kernels run slower (`perf` < 1, from the GPU model; the
   overhead does not scale with clocks), so steps take longer, queues grow and
   a capped run lasts longer, as real capped runs do.
4. Compute intensity per cycle is the step's time-weighted mix: prefill is
   compute-bound (intensity ~1), decode is memory-bound (~0.6), the overhead
   is mostly waiting (~0.3); an idle engine has intensity 0.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Trace:
    """The benchmark client's request trace (step 1)."""

    duration_s: float = 180.0
    peak_rpm: float = 1000.0
    ramp_s: float = 30.0
    prompt_median: float = 1800.0
    prompt_sigma: float = 0.7
    output_median: float = 350.0
    output_sigma: float = 0.6


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Throughput of the serving engine at full speed (steps 2 and 3)."""

    max_seqs: int = 256
    token_budget: int = 8192
    step_overhead_s: float = 0.011
    decode_per_seq_s: float = 3e-5
    prefill_tokens_per_s: float = 80_000.0
    intensity_prefill: float = 1.0
    intensity_decode: float = 0.62
    intensity_overhead: float = 0.30


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, median * math.exp(rng.gauss(0.0, sigma)))))


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method: fine for the fraction of a request expected per AC cycle."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class Engine:
    """Serves a trace cycle by cycle; `step()` returns the GPUs' compute intensity."""

    def __init__(self, trace: Trace, rng: random.Random, spec: EngineSpec | None = None,
                 start_s: float = 0.0) -> None:
        self.trace = trace
        self.spec = spec or EngineSpec()
        self.rng = rng
        self.start_s = start_s  # when the client starts sending, in run time
        self.swell = rng.uniform(0.0, 2 * math.pi)
        self.waiting: deque[list[int]] = deque()  # [prompt tokens left, output tokens]
        self.running: list[float] = []  # heap of the decode step each sequence ends at
        self.steps = 0.0  # decode steps done so far (fractional: a fluid model)
        self.sent = self.done = 0

    def rate_rpm(self, t: float) -> float:
        """The client's request rate at run time t (0 outside the trace)."""
        into = t - self.start_s
        if into < 0 or into >= self.trace.duration_s:
            return 0.0
        ramp = min(1.0, (into + 1.0) / self.trace.ramp_s)
        swell = 1.0 + 0.04 * math.sin(2 * math.pi * into / 37.0 + self.swell)
        return min(self.trace.peak_rpm, self.trace.peak_rpm * ramp * swell)

    @property
    def finished(self) -> bool:
        """The trace is over and every request has been answered."""
        return self.sent > 0 and self.done == self.sent and not self.waiting

    def step(self, t: float, dt: float, perf: float) -> float:
        """Advance one AC cycle of dt seconds at relative speed perf; compute intensity."""
        rng, tr, spec = self.rng, self.trace, self.spec
        for _ in range(_poisson(rng, self.rate_rpm(t) / 60.0 * dt)):
            self.waiting.append([
                _lognormal(rng, tr.prompt_median, tr.prompt_sigma, 64, 16_000),
                _lognormal(rng, tr.output_median, tr.output_sigma, 16, 4096)])
            self.sent += 1
        batch = len(self.running)
        if batch == 0 and not self.waiting:
            return 0.0
        chunk = self._chunk(spec.max_seqs - batch, spec.token_budget - batch)
        t_prefill = chunk / spec.prefill_tokens_per_s
        t_decode = spec.decode_per_seq_s * batch
        step_s = spec.step_overhead_s + t_decode + t_prefill
        # Clocks set the pace of the kernels, not of launches and NVLink waits.
        steps = dt / (spec.step_overhead_s + (t_decode + t_prefill) / max(perf, 0.05))
        self.steps += steps
        self._prefill(steps * chunk)
        while self.running and self.running[0] <= self.steps:
            heapq.heappop(self.running)
            self.done += 1
        mix = (t_prefill * spec.intensity_prefill + t_decode * spec.intensity_decode
               + spec.step_overhead_s * spec.intensity_overhead) / step_s
        return min(1.0, max(0.0, mix))

    def _chunk(self, room: int, budget: int) -> int:
        """Prompt tokens the next step can prefill: the first `room` waiting prompts."""
        chunk = 0
        for k, head in enumerate(self.waiting):
            if k >= room or chunk >= budget:
                break
            chunk += head[0]
        return min(chunk, max(0, budget))

    def _prefill(self, tokens: float) -> None:
        """Spend prefill work on waiting prompts in order; finished ones start decoding."""
        budget = int(tokens)
        while self.waiting and len(self.running) < self.spec.max_seqs:
            head = self.waiting[0]
            take = min(head[0], budget)
            head[0] -= take
            budget -= take
            if head[0] > 0:
                return
            self.waiting.popleft()
            heapq.heappush(self.running, self.steps + head[1])
            if budget <= 0:
                return
