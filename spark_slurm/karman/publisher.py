"""Publisher side of the Karman stream: replay a recording, or stream a live sim node.

Both pace themselves on the injected clock and stamp every frame's `utc_time`
with its scheduled send time, as the reference replay does, so consumers
cannot tell a replay from a device. Both stop on `count`, `duration_s` or a
`stop` event, so tests and the CLI's signal handling bound them the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import InputError
from spark_slurm.karman.csvfile import DEFAULT_STREAMS, Recording, read_recording
from spark_slurm.karman.rack import RackModel
from spark_slurm.karman.schema import DEFAULT_TOPIC, Cycle, encode_frame

_MAX_SLEEP_S = 0.05  # so a stop request is noticed promptly
REPLAY_RATE_HZ = 60.0  # the reference replay's RATE_HZ default: one message per AC cycle


class FrameSink(Protocol):
    """Where frames go: `transport.Publisher`, or a list-backed fake in unit tests."""

    def send(self, frame: bytes) -> bool: ...


@dataclass
class PublishStats:
    sent: int = 0
    dropped: int = 0  # sink queue full (slow or absent consumers)
    loops: int = 0


class _Pacer:
    """Waits until monotonic deadlines, in short sleeps that honour stop/duration."""

    def __init__(self, clock: Clock, stop: threading.Event | None,
                 duration_s: float | None) -> None:
        self.clock = clock
        self.stop = stop
        self.end = None if duration_s is None else clock.monotonic_ns() + int(duration_s * 1e9)

    def done(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            return True
        return self.end is not None and self.clock.monotonic_ns() >= self.end

    def wait_until(self, deadline_ns: int) -> bool:
        """Sleep until the deadline; False if told to stop first."""
        while True:
            if self.done():
                return False
            left = deadline_ns - self.clock.monotonic_ns()
            if left <= 0:
                return True
            self.clock.sleep(min(left / 1e9, _MAX_SLEEP_S))


def _send(sink: FrameSink, frame: bytes, stats: PublishStats) -> None:
    if sink.send(frame):
        stats.sent += 1
    else:
        stats.dropped += 1


def replay(recording: Recording, sink: FrameSink, *, topic: str = DEFAULT_TOPIC,
           rate_hz: float = REPLAY_RATE_HZ, speed: float = 1.0, loop: bool = False,
           count: int | None = None, duration_s: float | None = None,
           stop: threading.Event | None = None, clock: Clock = SYSTEM_CLOCK) -> PublishStats:
    """Send a recording as the reference replay does: at a fixed rate, stamped on schedule.

    Message k leaves at start + k / (rate_hz x speed) and carries that instant as
    its `utc_time`, whatever the CSV's own times were (they only group rows into
    cycles). Cycles keep the CSV's sequence numbers (offset by one span per loop,
    so a loop does not look like a publisher restart); without them cycles are
    numbered 0, 1, ... in send order.
    """
    if not speed > 0:
        raise InputError(f"--speed must be positive, not {speed}")
    if not rate_hz > 0:
        raise InputError(f"--rate must be positive, not {rate_hz}")
    hz = rate_hz * speed
    cycles = recording.cycles
    stats = PublishStats()
    pacer = _Pacer(clock, stop, duration_s)
    seqs = [c.seq for c in cycles if c.seq is not None]
    seq_span = (max(seqs) - min(seqs) + 1) if seqs else 0
    base, start = clock.monotonic_ns(), clock.now_ns()
    index = 0
    while True:
        for cycle in cycles:
            if count is not None and stats.sent + stats.dropped >= count:
                return stats
            offset = round(index * 1e9 / hz)
            if not pacer.wait_until(base + offset):
                return stats
            seq = index if cycle.seq is None else cycle.seq + stats.loops * seq_span
            index += 1
            _send(sink, encode_frame(topic, Cycle(start + offset, seq, cycle.streams)), stats)
        stats.loops += 1
        if not loop:
            return stats


def live(gpu_power_mw: Callable[[], int], sink: FrameSink, *, topic: str = DEFAULT_TOPIC,
         rate_hz: float = 60.0, model: RackModel | None = None, count: int | None = None,
         duration_s: float | None = None, stop: threading.Event | None = None,
         clock: Clock = SYSTEM_CLOCK) -> PublishStats:
    """Stream the rack readings of a node whose GPUs draw `gpu_power_mw()` right now."""
    if not rate_hz > 0:
        raise InputError(f"--rate must be positive, not {rate_hz}")
    model = model or RackModel()
    stats = PublishStats()
    pacer = _Pacer(clock, stop, duration_s)
    period_ns = int(1e9 / rate_hz)
    base = clock.monotonic_ns()
    seq = 0
    while count is None or seq < count:
        if not pacer.wait_until(base + seq * period_ns):
            break
        cycle = model.cycle(clock.now_ns(), seq, gpu_power_mw() / 1000.0)
        _send(sink, encode_frame(topic, cycle), stats)
        seq += 1
    return stats


def sim_gpu_power(state_dir: Path, clock: Clock = SYSTEM_CLOCK,
                  min_interval_s: float = 0.1) -> Callable[[], int]:
    """Total power (mW) of a simulated node's GPUs, re-read at most every min_interval_s.

    Reads the physical state, not the driver's view: the PDU meter keeps measuring
    while a GPU's driver has crashed (NVML calls fail, the GPU still draws power).
    """
    from spark_slurm.gpu.sim import SimFleet  # noqa: PLC0415 - only the sim stream needs it

    fleet = SimFleet.open(state_dir, clock)
    indices = range(len(fleet.devices))
    last: list[int] = [0, -1]  # value, monotonic time read (ns)

    def read() -> int:
        now = clock.monotonic_ns()
        if last[1] < 0 or now - last[1] >= min_interval_s * 1e9:
            last[0] = sum(round(fleet.state(i).power_mw) for i in indices)
            last[1] = now
        return last[0]

    return read


def _open_publisher(bind: str, wait_subscriber_s: float) -> Any:
    from spark_slurm.karman.transport import Publisher  # noqa: PLC0415 - ZeroMQ is lazy

    pub = Publisher(bind)
    if wait_subscriber_s > 0:
        pub.wait_for_subscriber(wait_subscriber_s)
    return pub


def replay_file(csv_path: Path, bind: str, *, topic: str = DEFAULT_TOPIC,
                rate_hz: float = REPLAY_RATE_HZ, speed: float = 1.0, loop: bool = False,
                count: int | None = None, duration_s: float | None = None,
                stop: threading.Event | None = None, wait_subscriber_s: float = 0.0,
                streams: tuple[str, ...] = DEFAULT_STREAMS,
                clock: Clock = SYSTEM_CLOCK) -> PublishStats:
    """Validate a CSV recording completely, then publish it on `bind` (see `replay`)."""
    recording = read_recording(csv_path, streams)
    pub = _open_publisher(bind, wait_subscriber_s)
    try:
        return replay(recording, pub, topic=topic, rate_hz=rate_hz, speed=speed, loop=loop,
                      count=count, duration_s=duration_s, stop=stop, clock=clock)
    finally:
        pub.close()


def live_sim(state_dir: Path, bind: str, *, topic: str = DEFAULT_TOPIC, rate_hz: float = 60.0,
             seed: int = 0, count: int | None = None, duration_s: float | None = None,
             stop: threading.Event | None = None, wait_subscriber_s: float = 0.0,
             clock: Clock = SYSTEM_CLOCK) -> PublishStats:
    """Publish the rack stream of the simulated node in `state_dir` (see `live`)."""
    source = sim_gpu_power(state_dir, clock)
    pub = _open_publisher(bind, wait_subscriber_s)
    try:
        return live(source, pub, topic=topic, rate_hz=rate_hz, model=RackModel(seed=seed),
                    count=count, duration_s=duration_s, stop=stop, clock=clock)
    finally:
        pub.close()
