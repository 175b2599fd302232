"""The subscriber's frame handling: everything odd is counted, nothing is fatal."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spark_slurm.clock import ManualClock
from spark_slurm.errors import InputError
from spark_slurm.karman.ring import CycleRing
from spark_slurm.karman.schema import (
    STREAMS_ARE_PHASES,
    TWO_PHASE_PER_STREAM,
    Cycle,
    PhaseReading,
    StreamReading,
    encode_frame,
)
from spark_slurm.karman.subscriber import CycleDecoder

NOW = 1_700_000_000_000_000_000
P = 16_666_667


def _frame(i: int, seq: int | None = None, *, time_ns: int | None = None, phase_b: bool = True,
           topic: str = "cycle-aligned", watts: float = 1000.0,
           b_watts: float | None = None) -> bytes:
    a = PhaseReading(real_power_w=watts, voltage_rms=120.0)
    b = a if b_watts is None else PhaseReading(real_power_w=b_watts, voltage_rms=120.0)
    streams = tuple(StreamReading(f"threephase/karman{k}", a, b if phase_b else None)
                    for k in (1, 2, 3))
    t = NOW + i * P if time_ns is None else time_ns
    return encode_frame(topic, Cycle(t, i if seq is None else seq, streams))


def _decoder(phases: str = STREAMS_ARE_PHASES, fast: bool = True
             ) -> tuple[CycleDecoder, ManualClock]:
    clock = ManualClock(start_ns=NOW)
    return CycleDecoder(CycleRing(1000), "cycle-aligned", clock, fast=fast,
                        phases=phases), clock


def test_good_frames_fill_the_ring() -> None:
    dec, _ = _decoder()
    for i in range(10):
        assert dec.feed(_frame(i))
    assert dec.counts["decoded"] == 10
    win = dec.ring.window(NOW, NOW + 9 * P)
    # streams are phases: rack = the sum of phase_a over the three streams
    assert (win.samples, win.mean_mw, win.streams) == (10, 3_000_000, 3)
    assert win.stream_mean_mw == (("threephase/karman1", 1_000_000),
                                  ("threephase/karman2", 1_000_000),
                                  ("threephase/karman3", 1_000_000))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(("phases", "want_mw"), [(STREAMS_ARE_PHASES, 3_000_000),
                                                 (TWO_PHASE_PER_STREAM, 4_500_000)])
def test_phase_semantics_decide_what_is_summed(phases: str, want_mw: int, fast: bool) -> None:
    # phase_b differs from phase_a (a device that fills it): the setting says which counts,
    # on the shape-cache path and on the generic path alike.
    dec, _ = _decoder(phases, fast)
    for i in range(20):
        assert dec.feed(_frame(i, b_watts=500.0))
    assert bool(dec._shapes) is fast
    win = dec.ring.window(NOW, NOW + 19 * P)
    assert (win.samples, win.mean_mw) == (20, want_mw)
    assert dict(win.stream_mean_mw)["threephase/karman2"] == want_mw // 3


def test_unknown_phase_semantics_are_refused() -> None:
    with pytest.raises(InputError, match="streams-are-phases or two-phase-per-stream"):
        _decoder("all-six")


def test_garbage_truncated_and_empty_frames_are_counted() -> None:
    dec, _ = _decoder()
    good = _frame(0)
    assert not dec.feed(good[:-7])  # truncated inside a field
    assert not dec.feed(b"cycle-aligned\xff\xff\xff\xff\xff")
    assert not dec.feed(b"cycle-aligned")  # topic only: no calculations
    assert dec.feed(_frame(1))
    assert dec.counts["bad_frames"] == 3
    assert dec.counts["frames"] == 4
    assert dec.counts["decoded"] == 1


def test_other_topics_are_counted_not_decoded() -> None:
    dec, _ = _decoder()
    assert not dec.feed(_frame(0, topic="fft"))
    assert not dec.feed(b"")
    assert dec.counts["other_topic"] == 2
    assert len(dec.ring) == 0


def test_missing_phase_b_counts_and_sums_phase_a_only() -> None:
    dec, _ = _decoder()
    assert dec.feed(_frame(0, phase_b=False))
    assert dec.counts["missing_phase_b"] == 3
    assert dec.ring.window(0, 2**62).mean_mw == 3_000_000


def test_sequence_gaps_and_publisher_restarts() -> None:
    dec, _ = _decoder()
    for i, seq in enumerate([5, 6, 9, 10, 0, 1]):
        dec.feed(_frame(i, seq))
    assert dec.counts["dropped"] == 2
    assert dec.counts["seq_gaps"] == 1
    assert dec.counts["publisher_restarts"] == 1


def test_absurd_time_falls_back_to_receive_time() -> None:
    dec, clock = _decoder()
    dec.feed(_frame(0, time_ns=0))
    assert dec.counts["time_fallbacks"] == 1
    assert dec.ring.latest_time() == clock.now_ns()


def test_backward_clock_jump_keeps_ring_ordered() -> None:
    dec, _ = _decoder()
    dec.feed(_frame(0, time_ns=NOW + 5 * 10**9))
    dec.feed(_frame(1, time_ns=NOW + 2 * 10**9))  # sender's clock stepped back 3 s
    assert dec.counts["clock_jumps"] == 1
    assert dec.ring.latest_time() == NOW + 5 * 10**9
    assert dec.ring.window(0, 2**62).samples == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_payloads_never_crash(payload: bytes) -> None:
    dec, _ = _decoder()
    dec.feed(b"cycle-aligned" + payload)
    c = dec.counts
    assert c["frames"] == 1
    assert c["decoded"] + c["bad_frames"] == 1
