"""Window statistics over the bounded cycle ring."""

from __future__ import annotations

import pytest

from spark_slurm.karman.ring import CycleRing, count_gaps

LAYOUT = (("s1", "phase_a"), ("s1", "phase_b"), ("s2", "phase_a"))
P = 16_666_667  # ns per 60 Hz cycle


def _fill(ring: CycleRing, n: int, start: int = 0, skip: set[int] | None = None) -> None:
    for i in range(n):
        if skip and i in skip:
            continue
        values = (100.0 + i, 200.0, 50.0)
        ring.append(start + i * P, b"", (round(sum(values) * 1000), LAYOUT, values))


def test_window_mean_min_max_and_streams() -> None:
    ring = CycleRing(100)
    _fill(ring, 10)
    win = ring.window(2 * P, 5 * P)  # cycles 2..5 inclusive
    totals = [(350 + i) * 1000 for i in range(2, 6)]
    assert win.samples == 4
    assert win.mean_mw == round(sum(totals) / 4)
    assert (win.min_mw, win.max_mw) == (min(totals), max(totals))
    assert win.streams == 2
    assert dict(win.stream_mean_mw) == {"s1": round((300 + 3.5) * 1000), "s2": 50_000}
    assert win.gaps == 0
    assert win.to_body() == {"mean_mw": win.mean_mw, "min_mw": win.min_mw,
                             "max_mw": win.max_mw, "samples": 4, "gaps": 0}


def test_empty_window_has_no_samples() -> None:
    ring = CycleRing(10)
    assert ring.window(0, 10**18).samples == 0
    _fill(ring, 5)
    win = ring.window(100 * P, 200 * P)
    assert (win.samples, win.mean_mw, win.streams) == (0, 0, 0)


def test_missing_cycles_count_as_gaps() -> None:
    ring = CycleRing(100)
    _fill(ring, 30, skip={10, 11, 12, 20})
    assert ring.window(0, 29 * P).gaps == 4
    assert ring.window(13 * P, 19 * P).gaps == 0


def test_ring_is_bounded_and_keeps_newest_in_order() -> None:
    ring = CycleRing(8)
    _fill(ring, 21)
    assert len(ring) == 8
    assert ring.latest_time() == 20 * P
    win = ring.window(0, 10**18)
    assert win.samples == 8
    assert win.min_mw == (350 + 13) * 1000  # oldest kept is cycle 13
    # A window straddling the wrap point sees both runs in order.
    raw_times = [t for t, _ in ring.raw_between(14 * P, 18 * P)]
    assert raw_times == [i * P for i in range(14, 19)]


def test_gap_counting_uses_median_period() -> None:
    assert count_gaps([0, 10, 20, 50, 60]) == 2
    assert count_gaps([0, 10]) == 0
    with pytest.raises(ValueError):
        CycleRing(1)


def test_summaries_are_computed_lazily_once() -> None:
    calls: list[bytes] = []

    def summarize(raw: bytes) -> tuple[int, tuple[tuple[str, str], ...], tuple[float, ...]]:
        calls.append(raw)
        return int(raw), (("s", "phase_a"),), (int(raw) / 1000,)

    ring = CycleRing(10, summarize)
    for i in range(5):
        ring.append(i * P, str(1000 * (i + 1)).encode())
    assert calls == []  # ingest does not summarize
    assert ring.window(3 * P, 4 * P).mean_mw == 4500
    assert ring.window(0, 4 * P).max_mw == 5000
    assert sorted(calls) == [b"1000", b"2000", b"3000", b"4000", b"5000"]  # each once
    bare = CycleRing(4)
    bare.append(0, b"x")
    with pytest.raises(ValueError, match="summar"):
        bare.window(0, 1)


def test_window_over_two_frame_shapes_groups_by_layout() -> None:
    ring = CycleRing(16)
    short = (("s1", "phase_a"), ("s2", "phase_a"))
    rows = [(LAYOUT, (100.0, 200.0, 50.0)), (short, (110.0, 40.0)),
            (LAYOUT, (120.0, 220.0, 60.0)), (short, (130.0, 45.0))]
    for i, (layout, values) in enumerate(rows):
        ring.append(i * P, b"", (round(sum(values) * 1000), layout, values))
    win = ring.window(0, 3 * P)
    totals = [round(sum(v) * 1000) for _, v in rows]
    assert (win.samples, win.min_mw, win.max_mw) == (4, min(totals), max(totals))
    assert win.mean_mw == round(sum(totals) / 4)
    # s1: both layouts, 4 cycles; s2: both layouts, 4 cycles (phase_a only in `short`).
    s1 = (100.0 + 200.0 + 120.0 + 220.0 + 110.0 + 130.0) * 1000 / 4
    s2 = (50.0 + 60.0 + 40.0 + 45.0) * 1000 / 4
    assert dict(win.stream_mean_mw) == {"s1": round(s1), "s2": round(s2)}
    assert win.streams == 2


def test_long_steps_counted_wherever_they_fall() -> None:
    assert count_gaps([0, 10, 40, 50, 60, 70, 130]) == 2 + 5
    assert count_gaps([0, 0, 0, 10]) == 0  # median step 0: no judgement
    assert count_gaps([0, 10, 25, 35]) == 0  # a step of exactly 1.5 periods is no gap
    assert count_gaps([0, 10, 26, 36]) == 1
