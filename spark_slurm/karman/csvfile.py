"""The recorded-data CSV format (reference replay input), read strictly and written exactly.

Header: time,stream_name,phase,rms_voltage,dc_offset_voltage,rms_current,
dc_offset_current,real_power,apparent_power,reactive_power,power_factor
[,sequence_number]. One row per stream per phase per cycle; `time` is Unix epoch
milliseconds. Files may be gzip-compressed (`.gz` or gzip magic). Every problem is
reported as a KarmanCsvError naming the file and line, before anything is sent.
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
from spark_slurm.karman.schema import PHASES, Cycle, PhaseReading, StreamReading

COLUMNS = ("time", "stream_name", "phase", "rms_voltage", "dc_offset_voltage", "rms_current",
           "dc_offset_current", "real_power", "apparent_power", "reactive_power",
           "power_factor")
SEQ_COLUMN = "sequence_number"
# CSV column -> PhaseReading field
_QUANTITIES = (("rms_voltage", "voltage_rms"), ("dc_offset_voltage", "voltage_dc_offset"),
               ("rms_current", "current_rms"), ("dc_offset_current", "current_dc_offset"),
               ("real_power", "real_power_w"), ("apparent_power", "apparent_power_va"),
               ("reactive_power", "reactive_power_var"), ("power_factor", "power_factor"))


@dataclass(frozen=True, slots=True)
class Recording:
    """A parsed recording: cycles in time order (time_ns from the CSV's ms)."""

    path: str
    cycles: tuple[Cycle, ...]
    has_sequence: bool


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


def read_recording(path: Path | str) -> Recording:
    """Parse and validate a whole recording; the first problem raises KarmanCsvError."""
    path = Path(path)
    name = str(path)
    cycles: list[Cycle] = []
    has_seq = False
    cur_time: int | None = None
    cur_seq: int | None = None
    entries: dict[str, dict[str, PhaseReading]] = {}
    first_line: dict[str, int] = {}

    def flush() -> None:
        if cur_time is None:
            return
        streams = []
        for stream, phases in entries.items():
            if "phase_a" not in phases:
                raise KarmanCsvError(f"stream {stream} has phase_b but no phase_a",
                                     name, first_line[stream])
            a = phases["phase_a"]
            # The reference replay sends a phase_a-only stream as both phases.
            streams.append(StreamReading(stream, a, phases.get("phase_b", a)))
        cycles.append(Cycle(cur_time * 1_000_000, cur_seq, tuple(streams)))

    for line, row in _rows(path):
        where = (name, line)
        t = _time_ms(row["time"], where)
        stream = row["stream_name"].strip()
        if not stream:
            raise KarmanCsvError("column stream_name is empty", *where)
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
        if cur_time is not None and t < cur_time:
            raise KarmanCsvError(f"time {t} is earlier than the previous row's {cur_time} "
                                 "(rows must be sorted by time)", *where)
        if t != cur_time:
            flush()
            cur_time, cur_seq, entries, first_line = t, seq, {}, {}
        values = {field: _number(row[col], col, where) for col, field in _QUANTITIES}
        reading = PhaseReading(**values)
        phases = entries.setdefault(stream, {})
        first_line.setdefault(stream, line)
        if phase in phases:
            raise KarmanCsvError(f"duplicate {stream} {phase} at time {t}", *where)
        phases[phase] = reading
        if cur_seq is None:
            cur_seq = seq
    flush()
    if not cycles:
        raise KarmanCsvError("no data rows", name)
    return Recording(name, tuple(cycles), has_seq)


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_rows(handle: IO[str], cycles: Iterable[Cycle], with_sequence: bool = True) -> int:
    """Write cycles in the CSV format (times in ms); returns the rows written."""
    out = csv.writer(handle, lineterminator="\n")
    out.writerow([*COLUMNS, SEQ_COLUMN] if with_sequence else list(COLUMNS))
    rows = 0
    for cycle in cycles:
        t_ms = cycle.time_ns // 1_000_000
        for stream in cycle.streams:
            for phase, r in stream.phases():
                row = [str(t_ms), stream.name, phase, _fmt(r.voltage_rms, 3),
                       _fmt(r.voltage_dc_offset, 4), _fmt(r.current_rms, 3),
                       _fmt(r.current_dc_offset, 4), _fmt(r.real_power_w, 2),
                       _fmt(r.apparent_power_va, 2), _fmt(r.reactive_power_var, 2),
                       _fmt(r.power_factor, 4)]
                if with_sequence:
                    row.append("" if cycle.seq is None else str(cycle.seq))
                out.writerow(row)
                rows += 1
    return rows


def write_recording(path: Path | str, cycles: Iterable[Cycle], with_sequence: bool = True) -> int:
    """Write a recording; `.gz` paths are gzip'd reproducibly (no name, mtime 0)."""
    path = Path(path)
    if path.suffix == ".gz":
        with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="",
                                                   mtime=0, compresslevel=9) as gz, \
                io.TextIOWrapper(gz, encoding="utf-8", newline="") as text:
            return write_rows(text, cycles, with_sequence)
    with path.open("w", encoding="utf-8", newline="") as handle:
        return write_rows(handle, cycles, with_sequence)
