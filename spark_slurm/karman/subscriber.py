"""Consume a Karman stream in the background and answer window questions about it.

`KarmanSubscriber` owns one thread with its own ZeroMQ context: it receives
frames, strips the topic, decodes, and files each cycle into a bounded ring. The
daemon only ever calls `window()`, `wait_until()` and `stats()`, which take a lock
for a few microseconds, so a slow or dead stream never blocks it. Everything odd
about a stream is counted rather than fatal: undecodable frames, other topics, a
missing phase_b, sequence gaps (drops), sequence resets (publisher restarts) and
clock jumps. Frames of a shape already seen are read by `shape.Shape` (masked
compare + struct unpack) rather than by walking upb objects, which is where most
of the per-frame time went; every other frame takes the generic upb path.

Rack power follows the configured phase semantics (`karman.phases`): with the
reference default `streams-are-phases` it is the sum over streams of phase_a
(phase_b is the replay's copy and is not read); with `two-phase-per-stream` it
adds both phases of every stream.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.karman.ring import CycleRing, FacilityWindow, Layout, Summary
from spark_slurm.karman.schema import (
    DEFAULT_PHASES,
    DEFAULT_TOPIC,
    TWO_PHASE_PER_STREAM,
    Cycle,
    bindings,
    check_phases,
    decode_payload,
)
from spark_slurm.karman.shape import Shape, learn
from spark_slurm.karman.transport import FrameReceiver

log = logging.getLogger(__name__)

COUNTERS = ("frames", "decoded", "bad_frames", "other_topic", "missing_phase_b", "dropped",
            "seq_gaps", "publisher_restarts", "clock_jumps", "time_fallbacks")
_WARN_EVERY_NS = 10_000_000_000
_MAX_SHAPES = 64  # a steady stream needs a handful (varint lengths of time and seq vary)
_MAX_LEARN_WAIT = 4096


class CycleDecoder:
    """Turns raw frames into ring entries and keeps the stream's counters.

    Separate from the thread so tests and benchmarks drive it directly with bytes.
    Time base: the frame's own `utc_time` (senders stamp it at send time); a time
    more than `max_skew_s` away from our clock is absurd and replaced by the
    receive time, and a time going backwards is a clock jump, filed at the later of
    the receive time and the newest time already held so windows stay ordered.
    """

    def __init__(self, ring: CycleRing, topic: str = DEFAULT_TOPIC, clock: Clock = SYSTEM_CLOCK,
                 max_skew_s: float = 30.0, *, fast: bool = True,
                 phases: str = DEFAULT_PHASES) -> None:
        self.ring = ring
        self.phases = check_phases(phases)
        # streams-are-phases: rack power is the sum of phase_a; phase_b is not read.
        self._both = phases == TWO_PHASE_PER_STREAM
        self.fast = fast  # False: every frame takes the generic path (for comparisons)
        if ring.summarize is None:
            ring.summarize = self.summarize
        self.topic = topic.encode()
        self.clock = clock
        self._now = clock.now_ns
        self.max_skew_ns = int(max_skew_s * 1_000_000_000)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._parse = bindings().CompositeJoinedCalculations.FromString
        self._last_seq: int | None = None
        self._last_time: int | None = None
        self._last_warn = -_WARN_EVERY_NS
        self._layouts: dict[tuple[str, ...], Layout] = {}
        self._shapes: dict[int, list[Shape]] = {}  # frame length -> learned shapes
        self._learn_wait = 0  # generic frames to skip before trying to learn again
        self._learn_backoff = 0

    def _warn(self, what: str) -> None:
        now = self.clock.monotonic_ns()
        if now - self._last_warn >= _WARN_EVERY_NS:
            self._last_warn = now
            log.warning("karman: %s (bad_frames=%d, other_topic=%d so far)", what,
                        self.counts["bad_frames"], self.counts["other_topic"])

    def feed(self, frame: bytes) -> bool:
        """File one frame; False when it was not a usable cycle of our topic."""
        counts = self.counts
        counts["frames"] += 1
        topic = self.topic
        if not frame.startswith(topic):
            counts["other_topic"] += 1
            return False
        shapes = self._shapes.get(len(frame))
        if shapes is not None:
            bits = int.from_bytes(frame, "little")
            for shape in shapes:
                if bits & shape.mask == shape.bits:
                    try:
                        time_ns, seq, summary = shape.read(frame)
                    except ValueError:
                        counts["bad_frames"] += 1
                        self._warn("frame with a non-finite power value")
                        return False
                    if time_ns < 0:
                        break  # odd time: let the generic path decide, as it always has
                    if shape.missing_b:
                        counts["missing_phase_b"] += shape.missing_b
                    self._file(time_ns, seq, frame[len(topic):], summary)
                    return True
        return self._feed_generic(frame)

    def _feed_generic(self, frame: bytes) -> bool:
        """Parse with upb and walk the message: any frame, at ~3x the cost of a known shape."""
        counts = self.counts
        payload = frame[len(self.topic):]
        try:
            msg = self._parse(payload)
        except Exception:  # protobuf DecodeError
            counts["bad_frames"] += 1
            self._warn("undecodable frame")
            return False
        time_ns = -1
        seq: int | None = None
        missing_b = 0
        for wrapper in msg.calculations:
            if not wrapper.HasField("calculations"):
                continue
            two = wrapper.calculations
            if time_ns < 0:
                prov = two.phase_a.provenance
                ts = prov.utc_time
                time_ns = ts.seconds * 1_000_000_000 + ts.nanos
                if prov.HasField("generic_sequence_number"):
                    seq = prov.generic_sequence_number
            power = two.phase_a.power_calculations.real_power_w
            if not two.HasField("phase_b"):
                missing_b += 1
            elif self._both:
                power += two.phase_b.power_calculations.real_power_w
            if not math.isfinite(power):  # NaN/inf would poison every window it falls in
                counts["bad_frames"] += 1
                self._warn("frame with a non-finite power value")
                return False
        counts["missing_phase_b"] += missing_b
        if time_ns < 0:
            counts["bad_frames"] += 1
            self._warn("frame without power calculations")
            return False
        self._file(time_ns, seq, payload)
        if self._learn_wait:
            self._learn_wait -= 1
        else:
            self._learn(frame, time_ns, seq, missing_b)
        return True

    def _learn(self, frame: bytes, time_ns: int, seq: int | None, missing_b: int) -> None:
        """Cache this frame's shape if it reads back exactly as the generic path read it."""
        shape = learn(frame, len(self.topic), self._intern, self._both) if self.fast else None
        if shape is None or shape.missing_b != missing_b or \
                shape.read(frame) != (time_ns, seq, self.summarize(frame[len(self.topic):])):
            self._learn_backoff = min(2 * self._learn_backoff + 1, _MAX_LEARN_WAIT)
            self._learn_wait = self._learn_backoff
            return
        self._learn_backoff = 0
        if sum(len(v) for v in self._shapes.values()) >= _MAX_SHAPES:
            self._shapes.clear()  # bounded memory; live shapes are relearned at once
        self._shapes.setdefault(len(frame), []).append(shape)

    def summarize(self, payload: bytes) -> Summary:
        """Rack total (mW) and real power per counted stream × phase of a validated payload."""
        names: list[str] = []
        values: list[float] = []
        both = self._both
        for wrapper in self._parse(payload).calculations:
            if not wrapper.HasField("calculations"):
                continue
            two = wrapper.calculations
            values.append(two.phase_a.power_calculations.real_power_w)
            if both and two.HasField("phase_b"):
                names.append(wrapper.calculation_name + "\0b")
                values.append(two.phase_b.power_calculations.real_power_w)
            else:
                names.append(wrapper.calculation_name)
        return round(sum(values) * 1000), self._intern(tuple(names)), tuple(values)

    def _intern(self, key: tuple[str, ...]) -> Layout:
        layout = self._layouts.get(key)
        return self._layout(key) if layout is None else layout

    def _layout(self, key: tuple[str, ...]) -> Layout:
        """(stream, phase) for each value of a frame shape; interned, shapes rarely change."""
        out: list[tuple[str, str]] = []
        for entry in key:
            name, _, has_b = entry.partition("\0")
            out.append((name, "phase_a"))
            if has_b:
                out.append((name, "phase_b"))
        layout = tuple(out)
        if len(self._layouts) < 64:
            self._layouts[key] = layout
        return layout

    def _file(self, time_ns: int, seq: int | None, payload: bytes,
              summary: Summary | None = None) -> None:
        """Track the sequence number, place the cycle in time, and store it (both paths)."""
        counts = self.counts
        last_seq = self._last_seq
        if seq is not None:
            if last_seq is not None:
                if seq > last_seq + 1:
                    counts["dropped"] += seq - last_seq - 1
                    counts["seq_gaps"] += 1
                elif seq <= last_seq:
                    counts["publisher_restarts"] += 1
            self._last_seq = seq
        now = self._now()
        if abs(time_ns - now) > self.max_skew_ns:
            counts["time_fallbacks"] += 1
            time_ns = now
        last = self._last_time
        if last is not None and time_ns < last:
            counts["clock_jumps"] += 1
            time_ns = max(now, last)
        self._last_time = time_ns
        self.ring.append(time_ns, payload, summary)
        counts["decoded"] += 1


class KarmanSubscriber:
    """Background consumer of one Karman endpoint and topic (see module docstring)."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5557", topic: str = DEFAULT_TOPIC, *,
                 buffer_seconds: float = 120, clock: Clock = SYSTEM_CLOCK,
                 max_rate_hz: float = 240.0, rcvhwm: int = 100_000,
                 max_skew_s: float = 30.0, phases: str = DEFAULT_PHASES) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self.clock = clock
        self.rcvhwm = rcvhwm
        capacity = max(2, int(buffer_seconds * max_rate_hz))
        self._lock = threading.Condition()
        self._decoder = CycleDecoder(CycleRing(capacity), topic, clock, max_skew_s,
                                     phases=phases)
        self.phases = phases
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self) -> None:
        """Connect and start receiving in a daemon thread (returns at once)."""
        if self._thread is not None:
            return
        receiver = FrameReceiver(self.endpoint, self.topic, self.rcvhwm)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(receiver,),
                                        name="karman-subscriber", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> KarmanSubscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, receiver: FrameReceiver) -> None:
        try:
            while not self._stop.is_set():
                frame = receiver.recv(100)
                if frame is None:
                    continue
                with self._lock:
                    # Drain what is queued in one lock hold, bounded so readers get a turn.
                    self._decoder.feed(frame)
                    for _ in range(255):
                        more = receiver.recv_nowait()
                        if more is None:
                            break
                        self._decoder.feed(more)
                    self._lock.notify_all()
        except Exception as exc:  # a receive thread must never die silently
            self._error = repr(exc)
            log.error("karman: subscriber stopped: %r", exc)
        finally:
            receiver.close()

    def feed(self, frame: bytes) -> bool:
        """File a frame as if received (for in-process producers and tests)."""
        with self._lock:
            ok = self._decoder.feed(frame)
            self._lock.notify_all()
        return ok

    def window(self, t0_ns: int, t1_ns: int) -> FacilityWindow:
        """Rack real power statistics for cycles stamped in [t0_ns, t1_ns]."""
        with self._lock:
            return self._decoder.ring.window(t0_ns, t1_ns)

    def latest_time_ns(self) -> int | None:
        with self._lock:
            return self._decoder.ring.latest_time()

    def wait_until(self, t_ns: int, timeout_s: float) -> bool:
        """Block until a cycle stamped at or after t_ns has arrived; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                latest = self._decoder.ring.latest_time()
                if latest is not None and latest >= t_ns:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))

    def recent_cycles(self, seconds: float) -> list[Cycle]:
        """Fully decoded cycles of the last `seconds` before the newest one, oldest first.

        Times are those the ring filed them under (after clock-jump guarding).
        """
        with self._lock:
            latest = self._decoder.ring.latest_time()
            if latest is None:
                return []
            raw = self._decoder.ring.raw_between(latest - int(seconds * 1e9) + 1, latest)
        out = []
        for t, payload in raw:
            cycle = decode_payload(payload)
            out.append(Cycle(time_ns=t, seq=cycle.seq, streams=cycle.streams))
        return out

    def last_cycles(self, n: int) -> list[Cycle]:
        """The newest n cycles, fully decoded, oldest first (the exporter's window)."""
        with self._lock:
            raw = self._decoder.ring.raw_last(n)
        out = []
        for t, payload in raw:
            cycle = decode_payload(payload)
            out.append(Cycle(time_ns=t, seq=cycle.seq, streams=cycle.streams))
        return out

    def stats(self) -> dict[str, int]:
        """Counters since start; `alive` is 1 while the receive thread runs."""
        with self._lock:
            out = dict(self._decoder.counts)
            out["buffered"] = len(self._decoder.ring)
        out["alive"] = int(self._thread is not None and self._thread.is_alive())
        return out

    @property
    def error(self) -> str | None:
        """Why the receive thread died, if it did."""
        return self._error


def iter_cycles(endpoint: str, topic: str = DEFAULT_TOPIC, *, count: int | None = None,
                duration_s: float | None = None, stop: threading.Event | None = None,
                counts: dict[str, int] | None = None,
                clock: Clock = SYSTEM_CLOCK) -> Iterator[Cycle]:
    """Yield each decoded cycle from an endpoint until count, duration or stop.

    Bad frames and other topics are counted into `counts` (when given) and skipped.
    """
    tally: dict[str, Any] = counts if counts is not None else {}
    for key in ("frames", "decoded", "bad_frames", "other_topic"):
        tally.setdefault(key, 0)
    prefix = topic.encode()
    receiver = FrameReceiver(endpoint, topic)
    end = None if duration_s is None else clock.monotonic_ns() + int(duration_s * 1e9)
    seen = 0
    try:
        while count is None or seen < count:
            if stop is not None and stop.is_set():
                return
            if end is not None and clock.monotonic_ns() >= end:
                return
            frame = receiver.recv(100)
            if frame is None:
                continue
            tally["frames"] += 1
            if not frame.startswith(prefix):
                tally["other_topic"] += 1
                continue
            try:
                cycle = decode_payload(frame[len(prefix):])
            except ValueError:
                tally["bad_frames"] += 1
                continue
            tally["decoded"] += 1
            seen += 1
            yield cycle
    finally:
        receiver.close()
