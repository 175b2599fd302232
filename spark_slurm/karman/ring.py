"""Bounded per-cycle history of the rack's real power, and window statistics over it.

One slot per received cycle holds its time and raw payload, and (once a window
has needed it) its summary: the rack total and the real power of every counted
stream × phase, i.e. the per-stream, per-phase buffer. Tools that want every quantity (the
exporter) re-decode the few payloads they need. Capacity is fixed at
construction, so memory is bounded however fast frames arrive; the oldest cycles
are overwritten.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter, sub
from typing import cast


@dataclass(frozen=True, slots=True)
class FacilityWindow:
    """Rack real power between two instants (per cycle: the sum over streams of the
    phases the phase semantics count; see subscriber.py).

    All powers are integer mW. With `samples == 0` the power fields are 0 and mean
    nothing. `gaps` counts cycles estimated missing inside the window (an interval
    longer than 1.5 × the median cycle period counts its missing cycles).
    """

    t0_ns: int
    t1_ns: int
    mean_mw: int
    min_mw: int
    max_mw: int
    samples: int
    gaps: int
    streams: int
    stream_mean_mw: tuple[tuple[str, int], ...] = ()

    def to_body(self) -> dict[str, int]:
        """The `window` object of a facility PER (docs/per-schema.md)."""
        return {"mean_mw": self.mean_mw, "min_mw": self.min_mw, "max_mw": self.max_mw,
                "samples": self.samples, "gaps": self.gaps}


Layout = tuple[tuple[str, str], ...]
# (rack total mW, layout, real power W per layout entry); layout[k] = (stream, phase).
Summary = tuple[int, Layout, tuple[float, ...]]


class CycleRing:
    """Fixed-capacity circular store of cycles in non-decreasing time order.

    A cycle's real-power summary may be given at append time or left for
    `summarize(raw)` to compute the first time a window needs it: ingest then
    only pays for validating the frame, and window queries (a few seconds around
    each cap change) pay for the cycles they actually look at.
    """

    def __init__(self, capacity: int,
                 summarize: Callable[[bytes], Summary] | None = None) -> None:
        if capacity < 2:
            raise ValueError("ring capacity must be at least 2")
        self.capacity = capacity
        self.summarize = summarize
        self._times: list[int] = []
        self._summaries: list[Summary | None] = []
        self._raw: list[bytes] = []
        self._start = 0  # index of the oldest slot once the ring has wrapped

    def __len__(self) -> int:
        return len(self._times)

    def append(self, time_ns: int, raw: bytes = b"", summary: Summary | None = None) -> None:
        """Add one cycle (payload and optional summary). Times must not decrease."""
        if len(self._times) < self.capacity:
            self._times.append(time_ns)
            self._summaries.append(summary)
            self._raw.append(raw)
            return
        i = self._start
        self._times[i] = time_ns
        self._summaries[i] = summary
        self._raw[i] = raw
        self._start = (i + 1) % self.capacity

    def _summary(self, i: int) -> Summary:
        summary = self._summaries[i]
        if summary is None:
            if self.summarize is None:
                raise ValueError("cycle stored without a summary and no summarizer")
            summary = self.summarize(self._raw[i])
            self._summaries[i] = summary
        return summary

    def latest_time(self) -> int | None:
        if not self._times:
            return None
        return self._times[(self._start - 1) % len(self._times)]

    def _runs(self, t0_ns: int, t1_ns: int) -> list[tuple[int, int]]:
        """Slot ranges [a, b) of cycles with t0 <= time <= t1, oldest first."""
        n = len(self._times)
        out: list[tuple[int, int]] = []
        # The buffer is two sorted runs: [start, n) then [0, start).
        for lo, hi in ((self._start, n), (0, self._start)):
            if lo >= hi:
                continue
            a = bisect_left(self._times, t0_ns, lo, hi)
            b = bisect_right(self._times, t1_ns, lo, hi)
            if a < b:
                out.append((a, b))
        return out

    def raw_between(self, t0_ns: int, t1_ns: int) -> list[tuple[int, bytes]]:
        """(time_ns, payload) of the cycles in [t0, t1], oldest first."""
        return [(self._times[i], self._raw[i])
                for a, b in self._runs(t0_ns, t1_ns) for i in range(a, b)]

    def raw_last(self, n: int) -> list[tuple[int, bytes]]:
        """(time_ns, payload) of the newest n cycles (fewer if fewer held), oldest first."""
        size = len(self._times)
        n = max(0, min(n, size))
        order = [(self._start - n + k) % size for k in range(n)]
        return [(self._times[i], self._raw[i]) for i in order]

    def window(self, t0_ns: int, t1_ns: int) -> FacilityWindow:
        """Mean, min and max of rack real power, sample count and gaps over [t0, t1]."""
        runs = self._runs(t0_ns, t1_ns)
        if not runs:
            return FacilityWindow(t0_ns, t1_ns, 0, 0, 0, 0, 0, 0)
        # Whole slices at C speed; only cycles never summarized are visited one by one.
        times: list[int] = []
        summaries: list[Summary | None] = []
        for a, b in runs:
            times += self._times[a:b]
            if None in (chunk := self._summaries[a:b]):
                chunk = [self._summary(i) for i in range(a, b)]
            summaries += chunk
        done = cast(list[Summary], summaries)
        totals = list(map(_total, done))
        layouts = list(map(_layout, done))
        # Mean of a stream's per-cycle sum = sum of its phases' means (linear), so each
        # layout's columns are summed at C speed instead of per cycle in Python.
        by_layout: dict[Layout, list[tuple[float, ...]]] = {}
        if layouts.count(layouts[0]) == len(layouts):  # one frame shape: the usual case
            by_layout[layouts[0]] = list(map(_values, done))
        else:
            for _total_mw, layout, values in done:
                by_layout.setdefault(layout, []).append(values)
        stream_sum: dict[str, float] = {}
        stream_n: dict[str, int] = {}
        for layout, rows in by_layout.items():
            seen: set[str] = set()
            for (stream, _phase), column in zip(layout, zip(*rows, strict=True), strict=True):
                stream_sum[stream] = stream_sum.get(stream, 0.0) + sum(column)
                if stream not in seen:
                    seen.add(stream)
                    stream_n[stream] = stream_n.get(stream, 0) + len(rows)
        per_stream = {s: round(stream_sum[s] * 1000 / stream_n[s]) for s in stream_sum}
        return FacilityWindow(
            t0_ns=t0_ns, t1_ns=t1_ns,
            mean_mw=round(sum(totals) / len(totals)),
            min_mw=min(totals), max_mw=max(totals),
            samples=len(totals), gaps=count_gaps(times),
            streams=len(per_stream),
            stream_mean_mw=tuple(sorted(per_stream.items())),
        )


_total, _layout, _values = itemgetter(0), itemgetter(1), itemgetter(2)


def count_gaps(times: list[int]) -> int:
    """Cycles missing between sorted instants, judged against the median spacing."""
    if len(times) < 3:
        return 0
    steps = sorted(map(sub, times[1:], times[:-1]))
    period = steps[len(steps) // 2]
    if period <= 0:
        return 0
    # Steps are sorted, so the long ones are a tail found by bisection.
    long_steps = steps[bisect_right(steps, period * 3 // 2):]
    return sum(max(1, round(dt / period) - 1) for dt in long_steps)
