"""The frame-shape fast path must give exactly the generic (upb walk) path's verdicts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spark_slurm.clock import ManualClock
from spark_slurm.karman import shape as shape_mod
from spark_slurm.karman import subscriber
from spark_slurm.karman.rack import RackModel
from spark_slurm.karman.ring import CycleRing
from spark_slurm.karman.schema import (
    PHASE_MODES,
    STREAMS_ARE_PHASES,
    TWO_PHASE_PER_STREAM,
    Cycle,
    PhaseReading,
    StreamReading,
    encode_frame,
)
from spark_slurm.karman.subscriber import CycleDecoder
from tests.unit.karman import wire

NOW = 1_700_000_000_000_000_000
P = 16_666_667
TOPIC = b"cycle-aligned"


def _pair(phases: str = STREAMS_ARE_PHASES) -> tuple[CycleDecoder, CycleDecoder]:
    """A fast decoder and a generic-only one, on identical clocks."""
    return (CycleDecoder(CycleRing(64), "cycle-aligned", ManualClock(start_ns=NOW),
                         phases=phases),
            CycleDecoder(CycleRing(64), "cycle-aligned", ManualClock(start_ns=NOW), fast=False,
                         phases=phases))


def _state(dec: CycleDecoder) -> tuple[object, ...]:
    ring = dec.ring
    # repr: NaN readings must compare equal to themselves.
    return (dict(dec.counts), list(ring._times), list(ring._raw),
            repr([ring._summary(i) for i in range(len(ring))]), ring._start)


def _feed_both(fast: CycleDecoder, slow: CycleDecoder, frame: bytes) -> bool:
    ok = fast.feed(frame)
    assert ok == slow.feed(frame)
    assert _state(fast) == _state(slow)
    return ok


def _rack_frames(n: int, start: int = 0) -> list[bytes]:
    model = RackModel(seed=3)
    return [encode_frame("cycle-aligned", model.cycle(NOW + i * P + i * 7919, i, 5000.0 + i))
            for i in range(start, start + n)]


@pytest.mark.parametrize("phases", PHASE_MODES)
def test_rack_stream_takes_the_fast_path_and_matches(phases: str) -> None:
    fast, slow = _pair(phases)
    frames = _rack_frames(300)
    for frame in frames:
        _feed_both(fast, slow, frame)
    assert fast._shapes  # shapes were learned
    learned = sum(len(v) for v in fast._shapes.values())
    assert learned <= 8
    assert fast.ring.window(0, 2**62) == slow.ring.window(0, 2**62)
    assert fast.ring.window(NOW + 10 * P, NOW + 50 * P) == slow.ring.window(NOW + 10 * P,
                                                                            NOW + 50 * P)


def _phase(seconds: int, nanos: int, seq: int | None, real: float = 800.0) -> bytes:
    return wire.phase(seconds=seconds, nanos=nanos, seq=seq, v_rms=120.0, v_dc=0.0,
                      i_rms=7.0, i_dc=0.0, real=real, apparent=810.0, reactive=20.0, pf=0.98)


def _odd_payloads() -> list[bytes]:
    s = NOW // 1_000_000_000
    a = _phase(s, 250_000_000, 9)
    fft = wire.field_bytes(1, b"fft/karman1") + wire.field_bytes(3, wire.field_float(2, 1.5))
    no_power = (wire.field_bytes(1, wire.field_bytes(1, wire.field_varint(1, s)))
                + wire.field_bytes(2, wire.field_float(1, 120.0)))
    return [
        wire.joined(wire.wrapper("m1", a, None), wire.wrapper("m2", a, a)),  # missing phase_b
        wire.joined(wire.wrapper("m1", _phase(s, 0, None), _phase(s, 0, None))),  # no nanos/seq
        wire.joined(wire.wrapper("m1", _phase(s, 2**31 + 5, 3), None)),  # int32 wraps negative
        wire.joined(wire.wrapper("m1", _phase(s, 2**34 + 7, 3), None)),  # bits above 32 dropped
        wire.joined(wire.wrapper("m1", _phase(0, 2**32 - 5, 3), None)),  # negative time
        wire.field_bytes(1, fft) + wire.joined(wire.wrapper("m1", a, a)),  # FFT first
        wire.joined(wire.wrapper("m1", a, a)) + wire.field_bytes(1, fft),
        wire.joined(wire.wrapper("", a, a)),
        wire.joined(wire.field_bytes(2, wire.field_bytes(1, no_power))),  # no real power
        wire.joined(wire.wrapper("m1", a + a, a)),  # repeated phase fields: upb merges
        wire.field_bytes(1, fft),  # no power calculations at all
        wire.joined(wire.wrapper("m1", _phase(s, 7, 2**60), _phase(s, 7, 2**60))),
    ]


def test_odd_shapes_read_exactly_as_the_generic_path() -> None:
    for payload in _odd_payloads():
        fast, slow = _pair()
        for _ in range(3):  # learn, then hit the learned shape
            _feed_both(fast, slow, TOPIC + payload)


def test_unsupported_shapes_are_not_learned_and_backoff_is_bounded() -> None:
    s = NOW // 1_000_000_000
    a = _phase(s, 5, 1)
    merged = TOPIC + wire.joined(wire.wrapper("m1", a + a, a))
    fast, slow = _pair()
    for _ in range(50):
        _feed_both(fast, slow, merged)
    assert not fast._shapes
    assert fast._learn_backoff <= 4096


def test_shape_cache_is_bounded() -> None:
    limit = subscriber._MAX_SHAPES
    fast, _ = _pair()
    s = NOW // 1_000_000_000
    for k in range(3 * limit):
        name = "m" * (k + 1)  # a new length, so a new shape, every frame
        fast.feed(TOPIC + wire.joined(wire.wrapper(name, _phase(s, 5, k + 1), None)))
    assert sum(len(v) for v in fast._shapes.values()) <= limit
    assert fast.counts["decoded"] == 3 * limit


def test_learn_rejects_frames_it_cannot_read() -> None:
    assert shape_mod.learn(TOPIC + b"\xff\xff", len(TOPIC), lambda key: ()) is None
    assert shape_mod.learn(TOPIC + wire.field_varint(1, 5), len(TOPIC), lambda key: ()) is None


_BASE = _rack_frames(4)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_frames_get_identical_verdicts(data: st.DataObject) -> None:
    fast, slow = _pair()
    for frame in _BASE[:2]:
        _feed_both(fast, slow, frame)
    mutated = bytearray(_BASE[2])
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(len(TOPIC), len(mutated) - 1))
        if data.draw(st.booleans()):
            mutated[pos] ^= 1 << data.draw(st.integers(0, 6))  # a value bit: often still a match
        else:
            mutated[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(len(TOPIC), len(mutated)))
        mutated = mutated[:cut]
    _feed_both(fast, slow, bytes(mutated))
    _feed_both(fast, slow, _BASE[3])


def _frame_with_power(seq: int, phase_a_w: float, phase_b_w: float | None) -> bytes:
    """A one-stream frame whose real power the test chooses (NaN and inf included)."""
    b = None if phase_b_w is None else PhaseReading(real_power_w=phase_b_w)
    stream = StreamReading("threephase/karman1", PhaseReading(real_power_w=phase_a_w), b)
    return encode_frame("cycle-aligned", Cycle(NOW + seq * P, seq, (stream,)))


@pytest.mark.parametrize("phases", PHASE_MODES)
def test_non_finite_power_is_a_bad_frame_on_both_paths_and_never_poisons_a_window(
        phases: str) -> None:
    nan, inf = float("nan"), float("inf")
    both = phases == TWO_PHASE_PER_STREAM
    for poison in ((nan, 100.0), (100.0, inf), (-inf, None)):
        fast, slow = _pair(phases)
        # Enough good frames for the fast path to learn the shape first.
        for seq in range(20):
            _feed_both(fast, slow, _frame_with_power(seq, 100.0, 100.0 if poison[1] else None))
        before = dict(fast.counts)
        # A phase the semantics do not count is not read: streams-are-phases takes phase_a.
        counted_bad = not math.isfinite(poison[0]) or (both and poison[1] is not None
                                                       and not math.isfinite(poison[1]))
        assert _feed_both(fast, slow, _frame_with_power(20, *poison)) is not counted_bad
        assert fast.counts["bad_frames"] == before["bad_frames"] + counted_bad
        window = fast.ring.window(0, 2**62)
        assert window.samples == 20 + (not counted_bad)
        assert window.mean_mw == (200_000 if both and poison[1] else 100_000)
