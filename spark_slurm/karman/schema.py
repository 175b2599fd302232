"""The Karman wire message as plain records, and the one place that touches protobuf.

A frame on the wire is the topic bytes immediately followed by a serialized
`CompositeJoinedCalculations` (see proto/karman.proto). Everything else in the
package works with the frozen records below, so only this module (and the
subscriber's hot path) needs the generated bindings, which are imported lazily.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from spark_slurm.errors import InputError, KarmanError

PHASES = ("phase_a", "phase_b")
DEFAULT_TOPIC = "cycle-aligned"
# The reference replay publishes CSV stream `karmanN` as `threephase/karmanN`.
STREAM_PREFIX = "threephase/"
# How a stream's two phase fields relate to the feed (karman-wire.md, phase semantics):
# the reference stack's three streams ARE the phases A, B, C and only phase_a carries
# a reading (phase_b is a copy), so rack power = sum over streams of phase_a. A meter
# whose streams really are two-phase (split-phase legs) sums both.
STREAMS_ARE_PHASES = "streams-are-phases"
TWO_PHASE_PER_STREAM = "two-phase-per-stream"
PHASE_MODES = (STREAMS_ARE_PHASES, TWO_PHASE_PER_STREAM)
DEFAULT_PHASES = STREAMS_ARE_PHASES


def check_phases(mode: str) -> str:
    """The mode itself, or an InputError naming the valid ones."""
    if mode not in PHASE_MODES:
        raise InputError(f"unknown Karman phase semantics {mode!r} "
                         f"(choose {' or '.join(PHASE_MODES)})")
    return mode
_PROTO_MODULE = "spark_slurm.karman._proto.karman_pb2"


def _source_generator() -> Path | None:
    """proto/generate.py beside the package in a source checkout (None when installed)."""
    candidate = Path(__file__).resolve().parents[2] / "proto" / "generate.py"
    return candidate if candidate.exists() else None


def _stale(proto_dir: Path) -> bool:
    """True when the generated module is missing or older than a .proto (or the generator)."""
    out = Path(__file__).resolve().parent / "_proto" / "karman_pb2.py"
    if not out.exists():
        return True
    built = out.stat().st_mtime
    inputs = [*proto_dir.glob("*.proto"), proto_dir / "generate.py"]
    return any(p.stat().st_mtime > built for p in inputs)


@functools.cache
def bindings() -> ModuleType:
    """The generated karman_pb2 module; generates it first in a fresh source checkout."""
    generator = _source_generator()
    if generator is not None and _stale(generator.parent):
        # Cheap when up to date (mtime check); keeps bindings from going stale.
        done = subprocess.run([sys.executable, str(generator)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise KarmanError(f"cannot generate Karman bindings: {done.stderr.strip()}")
    try:
        return importlib.import_module(_PROTO_MODULE)
    except ImportError as exc:
        if exc.name == _PROTO_MODULE:
            raise KarmanError("Karman protobuf bindings missing from this installation "
                              "(in a checkout: `make proto`; a built wheel carries them)") \
                from exc
        raise KarmanError(_unusable(exc)) from exc
    except Exception as exc:  # protobuf's VersionError: a runtime the bindings reject
        raise KarmanError(_unusable(exc)) from exc


def _unusable(exc: BaseException) -> str:
    """Why generated bindings do not load: almost always a protobuf outside their range."""
    try:
        import google.protobuf  # noqa: PLC0415

        runtime = str(google.protobuf.__version__)
    except ImportError:
        runtime = "(none)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"Karman protobuf bindings do not load with the installed protobuf {runtime} "
            f"({first}); install the protobuf version spark-slurm requires")


@dataclass(frozen=True, slots=True)
class PhaseReading:
    """One phase of one stream for one AC cycle; None where the sender left a field out."""

    real_power_w: float | None = None
    apparent_power_va: float | None = None
    reactive_power_var: float | None = None
    power_factor: float | None = None
    voltage_rms: float | None = None
    voltage_dc_offset: float | None = None
    current_rms: float | None = None
    current_dc_offset: float | None = None


@dataclass(frozen=True, slots=True)
class StreamReading:
    """One meter (e.g. `threephase/karman1`) for one cycle; phase_b may be absent."""

    name: str
    phase_a: PhaseReading
    phase_b: PhaseReading | None = None

    def phases(self) -> list[tuple[str, PhaseReading]]:
        out = [("phase_a", self.phase_a)]
        if self.phase_b is not None:
            out.append(("phase_b", self.phase_b))
        return out

    def counted(self, phases: str = DEFAULT_PHASES) -> list[tuple[str, PhaseReading]]:
        """The readings that count towards power under the phase semantics."""
        if phases == STREAMS_ARE_PHASES:
            return [("phase_a", self.phase_a)]
        return self.phases()

    def real_power_w(self, phases: str = DEFAULT_PHASES) -> float:
        """The stream's real power: phase_a, or phase_a + phase_b for two-phase meters."""
        return sum(p.real_power_w or 0.0 for _, p in self.counted(phases))


@dataclass(frozen=True, slots=True)
class Cycle:
    """One published message: every stream's reading for the same AC cycle."""

    time_ns: int
    seq: int | None
    streams: tuple[StreamReading, ...]

    def real_power_w(self, phases: str = DEFAULT_PHASES) -> float:
        """Rack real power: the sum over streams of each stream's counted phases."""
        return sum(s.real_power_w(phases) for s in self.streams)


_POWER_FIELDS = (("real_power_w", "real_power_w"), ("apparent_power_va", "apparent_power_va"),
                 ("reactive_power_var", "reactive_power_var"), ("power_factor", "power_factor"))


def _fill_phase(msg: Any, reading: PhaseReading, time_ns: int, seq: int | None) -> None:
    prov = msg.provenance
    prov.utc_time.seconds, prov.utc_time.nanos = divmod(time_ns, 1_000_000_000)
    if seq is not None:
        prov.generic_sequence_number = seq
    for attr, field in _POWER_FIELDS:
        value = getattr(reading, attr)
        if value is not None:
            setattr(msg.power_calculations, field, value)
    volt, amp = msg.voltage_waveform_calculations_v, msg.current_waveform_calculations_a
    if reading.voltage_rms is not None:
        volt.rms = reading.voltage_rms
    if reading.voltage_dc_offset is not None:
        volt.dc_offset = reading.voltage_dc_offset
    if reading.current_rms is not None:
        amp.rms = reading.current_rms
    if reading.current_dc_offset is not None:
        amp.dc_offset = reading.current_dc_offset


def encode_payload(cycle: Cycle) -> bytes:
    """Serialize a cycle as CompositeJoinedCalculations (no topic)."""
    pb = bindings()
    msg = pb.CompositeJoinedCalculations()
    for stream in cycle.streams:
        wrapper = msg.calculations.add()
        wrapper.calculation_name = stream.name
        two = wrapper.calculations
        _fill_phase(two.phase_a, stream.phase_a, cycle.time_ns, cycle.seq)
        if stream.phase_b is not None:
            _fill_phase(two.phase_b, stream.phase_b, cycle.time_ns, cycle.seq)
    data: bytes = msg.SerializeToString()
    return data


def encode_frame(topic: str, cycle: Cycle) -> bytes:
    """One ZeroMQ frame: topic bytes immediately followed by the payload."""
    return topic.encode() + encode_payload(cycle)


def _opt(msg: Any, field: str) -> float | None:
    return float(getattr(msg, field)) if msg.HasField(field) else None


def _read_phase(msg: Any) -> PhaseReading:
    pc = msg.power_calculations
    volt, amp = msg.voltage_waveform_calculations_v, msg.current_waveform_calculations_a
    return PhaseReading(
        real_power_w=_opt(pc, "real_power_w"),
        apparent_power_va=_opt(pc, "apparent_power_va"),
        reactive_power_var=_opt(pc, "reactive_power_var"),
        power_factor=_opt(pc, "power_factor"),
        voltage_rms=_opt(volt, "rms"),
        voltage_dc_offset=_opt(volt, "dc_offset"),
        current_rms=_opt(amp, "rms"),
        current_dc_offset=_opt(amp, "dc_offset"),
    )


def decode_payload(payload: bytes) -> Cycle:
    """Parse a payload into a Cycle; raises ValueError when it is not a Karman message.

    The cycle's time and sequence number come from the first stream's phase_a
    provenance (every stream of one message describes the same cycle). FFT
    wrappers carry no power and are skipped.
    """
    pb = bindings()
    msg = pb.CompositeJoinedCalculations()
    try:
        msg.ParseFromString(payload)
    except Exception as exc:  # protobuf's DecodeError, whatever module it lives in
        raise ValueError(f"undecodable Karman payload: {exc}") from exc
    streams: list[StreamReading] = []
    time_ns, seq = 0, None
    for wrapper in msg.calculations:
        if wrapper.WhichOneof("data_product") != "calculations":
            continue
        two = wrapper.calculations
        if not streams:
            prov = two.phase_a.provenance
            time_ns = prov.utc_time.seconds * 1_000_000_000 + prov.utc_time.nanos
            if prov.HasField("generic_sequence_number"):
                seq = int(prov.generic_sequence_number)
        phase_b = _read_phase(two.phase_b) if two.HasField("phase_b") else None
        streams.append(StreamReading(wrapper.calculation_name, _read_phase(two.phase_a), phase_b))
    if not streams:
        raise ValueError("Karman message carries no power calculations")
    return Cycle(time_ns=time_ns, seq=seq, streams=tuple(streams))


def cycle_dict(cycle: Cycle, phases: str = DEFAULT_PHASES) -> dict[str, Any]:
    """A cycle as plain JSON-ready data (for `karman tail --json`); None fields omitted.

    Every phase received is listed; `real_power_w` is the rack total under `phases`.
    """
    streams = []
    for stream in cycle.streams:
        entry: dict[str, Any] = {"name": stream.name}
        for phase, reading in stream.phases():
            entry[phase] = {k: getattr(reading, k) for k in PhaseReading.__slots__
                            if getattr(reading, k) is not None}
        streams.append(entry)
    return {"time_ns": cycle.time_ns, "seq": cycle.seq, "phases": phases,
            "real_power_w": cycle.real_power_w(phases), "streams": streams}
