"""The recorded-data CSV format (reference replay input), read strictly and written exactly.

Header: time,stream_name,phase,rms_voltage,dc_offset_voltage,rms_current,
dc_offset_current,real_power,apparent_power,reactive_power,power_factor
[,sequence_number]. One row per stream per phase per cycle; `time` is Unix epoch
milliseconds; consecutive rows with the same time are one cycle. Streams are
named as in the reference recordings (`karman1..3`); a cycle on the wire names
them `threephase/karmanN`, so `Recording.cycles` carry the wire names and the
writer strips the prefix again. Files may be gzip-compressed (gzip magic).

A recording has one layout: the streams of its first cycle, each with phase_a
only (the reference recordings) or with phase_a and phase_b. Every cycle must
hold exactly that layout, with names from the configured stream set. Every
problem is a KarmanCsvError naming the file and line, raised before anything
is sent.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from spark_slurm.errors import KarmanCsvError
from spark_slurm.karman.schema import PHASES, STREAM_PREFIX, Cycle, PhaseReading, StreamReading

COLUMNS = ("time", "stream_name", "phase", "rms_voltage", "dc_offset_voltage", "rms_current",
           "dc_offset_current", "real_power", "apparent_power", "reactive_power",
           "power_factor")
SEQ_COLUMN = "sequence_number"
DEFAULT_STREAMS = ("karman1", "karman2", "karman3")
# CSV column -> PhaseReading field
_QUANTITIES = (("rms_voltage", "voltage_rms"), ("dc_offset_voltage", "voltage_dc_offset"),
               ("rms_current", "current_rms"), ("dc_offset_current", "current_dc_offset"),
               ("real_power", "real_power_w"), ("apparent_power", "apparent_power_va"),
               ("reactive_power", "reactive_power_var"), ("power_factor", "power_factor"))

# One cycle's layout: (stream, has phase_b) in file order.
Layout = tuple[tuple[str, bool], ...]


@dataclass(frozen=True, slots=True)
class Recording:
    """A parsed recording: cycles in time order (time_ns from the CSV's ms, wire names)."""

    path: str
    cycles: tuple[Cycle, ...]
    has_sequence: bool
    layout: Layout = ()

    @property
    def has_phase_b(self) -> bool:
        """True when the file itself holds phase_b rows (else phase_a is sent as both)."""
        return any(b for _, b in self.layout)


def _open_text(path: Path) -> IO[str]:
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _number(text: str, column: str, where: tuple[str, int]) -> float | None:
    text = text.strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise KarmanCsvError(f"column {column}: {text!r} is not a number", *where) from None
    if not math.isfinite(value):
        raise KarmanCsvError(f"column {column}: {text!r} is not a finite number", *where)
    return value


def _time_ms(text: str, where: tuple[str, int]) -> int:
    value = _number(text, "time", where)
    if value is None:
        raise KarmanCsvError("column time is empty", *where)
    if value < 0 or value != int(value):
        raise KarmanCsvError(f"column time: {text!r} is not whole epoch milliseconds", *where)
    return int(value)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    name = str(path)
    try:
        handle = _open_text(path)
    except OSError as exc:
        raise KarmanCsvError(f"cannot read: {exc.strerror or exc}", name) from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise KarmanCsvError("empty file (no header)", name, 1)
            header = [h.strip() for h in header]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise KarmanCsvError(f"header lacks column(s) {', '.join(missing)}", name, 1)
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise KarmanCsvError(
                        f"row has {len(row)} fields, header has {len(header)}", name, line)
                yield line, dict(zip(header, row, strict=True))
        except (csv.Error, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
            raise KarmanCsvError(f"unreadable CSV: {exc}", name) from exc


def _stream_name(text: str, streams: tuple[str, ...], where: tuple[str, int]) -> str:
    stream = text.strip()
    if not stream:
        raise KarmanCsvError("column stream_name is empty", *where)
    if stream in streams:
        return stream
    if stream.startswith(STREAM_PREFIX) and stream[len(STREAM_PREFIX):] in streams:
        raise KarmanCsvError(
            f"stream {stream!r} carries the wire prefix; recordings name streams "
            f"{', '.join(streams)} and the replay adds {STREAM_PREFIX!r}", *where)
    raise KarmanCsvError(f"stream {stream!r} is outside the layout ({', '.join(streams)}); "
                         "pass --streams to replay other names", *where)


def _describe(layout: Layout) -> str:
    return ", ".join(f"{s} {'phase_a+phase_b' if b else 'phase_a'}" for s, b in layout)


class _Reader:
    """Groups rows into cycles and holds every cycle to the first cycle's layout."""

    def __init__(self, name: str, streams: tuple[str, ...]) -> None:
        self.name = name
        self.streams = streams
        self.cycles: list[Cycle] = []
        self.layout: Layout | None = None
        self.layout_line = 0
        self.time: int | None = None
        self.seq: int | None = None
        self.entries: dict[str, dict[str, PhaseReading]] = {}
        self.first_line: dict[str, int] = {}

    def start(self, t: int, seq: int | None) -> None:
        self.flush()
        self.time, self.seq, self.entries, self.first_line = t, seq, {}, {}

    def flush(self) -> None:
        if self.time is None:
            return
        name = self.name
        out = []
        for stream, phases in self.entries.items():
            if "phase_a" not in phases:
                raise KarmanCsvError(f"stream {stream} has phase_b but no phase_a at time "
                                     f"{self.time}", name, self.first_line[stream])
            a = phases["phase_a"]
            # The reference replay sends a phase_a-only stream as both phases.
            out.append(StreamReading(STREAM_PREFIX + stream, a, phases.get("phase_b", a)))
        layout = tuple((s, "phase_b" in p) for s, p in self.entries.items())
        line = min(self.first_line.values())
        if self.layout is None:
            self.layout, self.layout_line = layout, line
        elif sorted(layout) != sorted(self.layout):
            raise KarmanCsvError(
                f"mixed layouts: the cycle at time {self.time} holds {_describe(layout)}, "
                f"but the first cycle (line {self.layout_line}) holds "
                f"{_describe(self.layout)}", name, line)
        self.cycles.append(Cycle(self.time * 1_000_000, self.seq, tuple(out)))


def read_recording(path: Path | str, streams: Iterable[str] = DEFAULT_STREAMS) -> Recording:
    """Parse and validate a whole recording; the first problem raises KarmanCsvError."""
    path = Path(path)
    name = str(path)
    allowed = tuple(streams)
    cyc = _Reader(name, allowed)
    has_seq = False
    for line, row in _rows(path):
        where = (name, line)
        t = _time_ms(row["time"], where)
        stream = _stream_name(row["stream_name"], allowed, where)
        phase = row["phase"].strip()
        if phase not in PHASES:
            raise KarmanCsvError(f"column phase: {phase!r} is not phase_a or phase_b", *where)
        seq = None
        if SEQ_COLUMN in row and row[SEQ_COLUMN].strip() != "":
            raw_seq = row[SEQ_COLUMN].strip()
            if not raw_seq.isdigit():
                raise KarmanCsvError(
                    f"column sequence_number: {raw_seq!r} is not a non-negative integer", *where)
            seq, has_seq = int(raw_seq), True
        if cyc.time is not None and t < cyc.time:
            raise KarmanCsvError(f"time {t} is earlier than the previous row's {cyc.time} "
                                 "(rows must be sorted by time)", *where)
        if t != cyc.time:
            cyc.start(t, seq)
        values = {field: _number(row[col], col, where) for col, field in _QUANTITIES}
        phases = cyc.entries.setdefault(stream, {})
        cyc.first_line.setdefault(stream, line)
        if phase in phases:
            raise KarmanCsvError(f"duplicate {stream} {phase} at time {t}", *where)
        phases[phase] = PhaseReading(**values)
        if cyc.seq is None:
            cyc.seq = seq
    cyc.flush()
    if not cyc.cycles:
        raise KarmanCsvError("no data rows", name)
    return Recording(name, tuple(cyc.cycles), has_seq, cyc.layout or ())


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_stream_name(wire_name: str) -> str:
    """`threephase/karman1` -> `karman1`, as the reference recordings name streams."""
    return wire_name[len(STREAM_PREFIX):] if wire_name.startswith(STREAM_PREFIX) else wire_name


def write_rows(handle: IO[str], cycles: Iterable[Cycle], with_sequence: bool = True,
               phase_b: bool = False) -> int:
    """Write cycles in the CSV format (times in ms); returns the rows written.

    Like the reference recordings, only phase_a is written unless `phase_b`.
    """
    out = csv.writer(handle, lineterminator="\n")
    out.writerow([*COLUMNS, SEQ_COLUMN] if with_sequence else list(COLUMNS))
    rows = 0
    for cycle in cycles:
        t_ms = cycle.time_ns // 1_000_000
        seq = "" if cycle.seq is None else str(cycle.seq)
        for stream in cycle.streams:
            name = csv_stream_name(stream.name)
            for phase, r in stream.phases() if phase_b else [("phase_a", stream.phase_a)]:
                row = [str(t_ms), name, phase, _fmt(r.voltage_rms, 3),
                       _fmt(r.voltage_dc_offset, 4), _fmt(r.current_rms, 3),
                       _fmt(r.current_dc_offset, 4), _fmt(r.real_power_w, 2),
                       _fmt(r.apparent_power_va, 2), _fmt(r.reactive_power_var, 2),
                       _fmt(r.power_factor, 4)]
                if with_sequence:
                    row.append(seq)
                out.writerow(row)
                rows += 1
    return rows


def write_recording(path: Path | str, cycles: Iterable[Cycle], with_sequence: bool = True,
                    phase_b: bool = False) -> int:
    """Write a recording; `.gz` paths are gzip'd reproducibly (no name, mtime 0)."""
    path = Path(path)
    if path.suffix == ".gz":
        with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="",
                                                   mtime=0, compresslevel=9) as gz, \
                io.TextIOWrapper(gz, encoding="utf-8", newline="") as text:
            return write_rows(text, cycles, with_sequence, phase_b)
    with path.open("w", encoding="utf-8", newline="") as handle:
        return write_rows(handle, cycles, with_sequence, phase_b)
