"""Replay and live publishing, paced on a manual clock into an in-memory sink."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import InputError
from spark_slurm.karman.csvfile import COLUMNS, read_recording
from spark_slurm.karman.publisher import live, replay
from spark_slurm.karman.rack import RackModel
from spark_slurm.karman.schema import decode_payload

TOPIC = b"cycle-aligned"


class ListSink:
    """Records each frame with the clock's monotonic time when it was sent."""

    def __init__(self, clock: ManualClock, accept: int | None = None) -> None:
        self.clock = clock
        self.sent: list[tuple[int, bytes]] = []
        self.accept = accept

    def send(self, frame: bytes) -> bool:
        if self.accept is not None and len(self.sent) >= self.accept:
            return False
        self.sent.append((self.clock.monotonic_ns(), frame))
        return True


def _csv(tmp_path: Path, times_ms: list[int], seq: bool = False) -> Path:
    header = ",".join(COLUMNS) + (",sequence_number" if seq else "")
    lines = [header]
    for i, t in enumerate(times_ms):
        row = f"{t},karman1,phase_a,120,0,8,0,{1000 + i},1010,100,0.99"
        lines.append(row + (f",{100 + i}" if seq else ""))
    path = tmp_path / "r.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _decode(frame: bytes) -> tuple[int, int | None, float]:
    assert frame.startswith(TOPIC)
    cycle = decode_payload(frame[len(TOPIC):])
    return cycle.time_ns, cycle.seq, cycle.streams[0].phase_a.real_power_w or 0.0


def test_replay_paces_at_a_fixed_60_hz_and_stamps_its_schedule(tmp_path: Path) -> None:
    # The CSV's own (uneven) times only group rows: the reference replay sends one
    # message every 1/60 s and stamps start + index/60 s.
    rec = read_recording(_csv(tmp_path, [1000, 1020, 1040, 1100]))
    clock = ManualClock()
    sink = ListSink(clock)
    start_mono, start_wall = clock.monotonic_ns(), clock.now_ns()
    stats = replay(rec, sink, clock=clock)
    assert stats.sent == 4 and stats.loops == 1
    want = [round(k * 1e9 / 60) for k in range(4)]
    assert [t - start_mono for t, _ in sink.sent] == want
    decoded = [_decode(f) for _, f in sink.sent]
    assert [d[0] for d in decoded] == [start_wall + o for o in want]
    assert [d[1] for d in decoded] == [0, 1, 2, 3]  # numbered: the CSV has no seq column
    assert [d[2] for d in decoded] == [1000, 1001, 1002, 1003]
    cycle = decode_payload(sink.sent[0][1][len(TOPIC):])
    assert [s.name for s in cycle.streams] == ["threephase/karman1"]
    assert cycle.streams[0].phase_b == cycle.streams[0].phase_a  # phase_a sent as both


def test_rate_speed_and_loop_keep_sequence_increasing(tmp_path: Path) -> None:
    rec = read_recording(_csv(tmp_path, [0, 100, 200], seq=True))
    clock = ManualClock()
    sink = ListSink(clock)
    base = clock.monotonic_ns()
    stats = replay(rec, sink, rate_hz=10, speed=2.0, loop=True, count=7, clock=clock)
    assert stats.sent == 7 and stats.loops == 2
    offsets = [(t - base) // 1_000_000 for t, _ in sink.sent]
    assert offsets == [0, 50, 100, 150, 200, 250, 300]
    assert [_decode(f)[1] for _, f in sink.sent] == [100, 101, 102, 103, 104, 105, 106]
    times = [_decode(f)[0] for _, f in sink.sent]
    assert times == sorted(times) and len(set(times)) == 7  # a loop never goes back in time


def test_stop_event_and_duration_end_a_replay(tmp_path: Path) -> None:
    rec = read_recording(_csv(tmp_path, [0, 1000, 2000, 3000]))
    clock = ManualClock()
    stopped = threading.Event()
    stopped.set()
    assert replay(rec, ListSink(clock), stop=stopped, clock=clock).sent == 0
    assert replay(rec, ListSink(clock), rate_hz=1, duration_s=1.5, clock=clock).sent == 2


def test_full_sink_counts_drops(tmp_path: Path) -> None:
    rec = read_recording(_csv(tmp_path, [0, 10, 20]))
    clock = ManualClock()
    stats = replay(rec, ListSink(clock, accept=1), clock=clock)
    assert (stats.sent, stats.dropped) == (1, 2)
    with pytest.raises(InputError, match="speed"):
        replay(rec, ListSink(clock), speed=0, clock=clock)
    with pytest.raises(InputError, match="rate"):
        replay(rec, ListSink(clock), rate_hz=-1, clock=clock)


def test_live_stream_steps_when_gpu_power_changes() -> None:
    clock = ManualClock()
    sink = ListSink(clock)
    gpu_mw = [8 * 900_000]

    def power() -> int:
        if len(sink.sent) == 30:
            gpu_mw[0] = 8 * 300_000  # a cap change lands
        return gpu_mw[0]

    model = RackModel(seed=3)
    stats = live(power, sink, rate_hz=60, model=model, count=60, clock=clock)
    assert stats.sent == 60
    totals = [decode_payload(f[len(TOPIC):]).real_power_w() for _, f in sink.sent]
    before, after = sum(totals[:30]) / 30, sum(totals[30:]) / 30
    # The rack sees the GPUs' change plus the PSUs' extra losses on it (a few per cent).
    expected_step = model.node_power_w(7200) - model.node_power_w(2400)
    assert before - after == pytest.approx(expected_step, rel=0.01)
    assert 1.02 < expected_step / 4800 < 1.08
    assert before == pytest.approx(model.node_power_w(7200), rel=0.01)
    cycle = decode_payload(sink.sent[0][1][len(TOPIC):])
    assert [s.name for s in cycle.streams] == [
        "threephase/karman1", "threephase/karman2", "threephase/karman3"]
    for stream in cycle.streams:
        assert stream.phase_b == stream.phase_a  # phases A/B/C: phase_b is a copy
        r = stream.phase_a
        assert r.voltage_rms is not None and 118 < r.voltage_rms < 123
        assert r.power_factor is not None and 0.95 < r.power_factor < 1.0
        assert r.current_rms is not None and r.apparent_power_va is not None
        assert r.current_rms == pytest.approx(r.apparent_power_va / r.voltage_rms, rel=1e-3)
    spacing = {b - a for (a, _), (b, _) in zip(sink.sent, sink.sent[1:], strict=False)}
    assert spacing <= {16_666_666, 16_666_667}
