"""Recorded-data CSV: strict reading with errors that name the line, exact writing."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spark_slurm.errors import KarmanCsvError
from spark_slurm.karman.csvfile import COLUMNS, read_recording, write_recording
from spark_slurm.karman.schema import TWO_PHASE_PER_STREAM

HEADER = ",".join(COLUMNS)


def _row(t: int, stream: str, phase: str, real: str = "1000.5", seq: str | None = None) -> str:
    cells = [str(t), stream, phase, "120.1", "0.01", "8.5", "0.0", real, "1020.0", "200.0",
             "0.98"]
    if seq is not None:
        cells.append(seq)
    return ",".join(cells)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def test_rows_group_into_cycles_and_get_the_wire_prefix(tmp_path: Path) -> None:
    csv = _write(tmp_path / "r.csv", [
        HEADER,
        _row(1000, "karman1", "phase_a"), _row(1000, "karman2", "phase_a", "500"),
        _row(1017, "karman1", "phase_a"), _row(1017, "karman2", "phase_a", "400"),
    ])
    rec = read_recording(csv)
    assert not rec.has_sequence and not rec.has_phase_b
    assert rec.layout == (("karman1", False), ("karman2", False))
    assert [c.time_ns for c in rec.cycles] == [1_000_000_000, 1_017_000_000]
    first = rec.cycles[0]
    assert [s.name for s in first.streams] == ["threephase/karman1", "threephase/karman2"]
    # phase_a only: sent as both phases, as the reference replay does
    assert first.streams[1].phase_b == first.streams[1].phase_a
    # streams are phases: the rack is the sum of phase_a, never a + b
    assert first.real_power_w() == pytest.approx(1000.5 + 500)
    assert first.real_power_w(TWO_PHASE_PER_STREAM) == pytest.approx(2 * (1000.5 + 500))


def test_two_phase_files_keep_phase_b(tmp_path: Path) -> None:
    csv = _write(tmp_path / "r.csv", [
        HEADER, _row(1000, "karman1", "phase_a"), _row(1000, "karman1", "phase_b", "900")])
    rec = read_recording(csv)
    assert rec.has_phase_b
    stream = rec.cycles[0].streams[0]
    assert stream.phase_b is not None and stream.phase_b.real_power_w == 900.0
    assert rec.cycles[0].real_power_w() == pytest.approx(1000.5)
    assert rec.cycles[0].real_power_w(TWO_PHASE_PER_STREAM) == pytest.approx(1900.5)


def test_other_stream_names_need_a_layout(tmp_path: Path) -> None:
    csv = _write(tmp_path / "r.csv", [HEADER, _row(1, "pdu7", "phase_a")])
    with pytest.raises(KarmanCsvError, match="outside the layout"):
        read_recording(csv)
    rec = read_recording(csv, streams=("pdu7",))
    assert rec.cycles[0].streams[0].name == "threephase/pdu7"


def test_gzip_and_sequence_numbers(tmp_path: Path) -> None:
    path = tmp_path / "r.csv.gz"
    text = "\n".join([HEADER + ",sequence_number", _row(5, "karman1", "phase_a", seq="17"),
                      _row(6, "karman1", "phase_a", seq="18")]) + "\n"
    path.write_bytes(gzip.compress(text.encode()))
    rec = read_recording(path)
    assert rec.has_sequence
    assert [c.seq for c in rec.cycles] == [17, 18]


K1, K2, K3 = "karman1", "karman2", "karman3"


@pytest.mark.parametrize(("lines", "message"), [
    ([HEADER.replace(",real_power", "")], ":1: header lacks column(s) real_power"),
    ([HEADER, _row(1, K1, "phase_a"), _row(2, K1, "phase_a", "12x")],
     ":3: column real_power: '12x' is not a number"),
    ([HEADER, _row(1, K1, "phase_a", "nan")], ":2: column real_power: 'nan' is not a finite"),
    ([HEADER, _row(5, K1, "phase_a"), _row(4, K1, "phase_a")],
     ":3: time 4 is earlier than the previous row's 5"),
    ([HEADER, _row(1, K1, "phase_c")], ":2: column phase: 'phase_c'"),
    ([HEADER, _row(1, K1, "phase_a"), "1,karman1,phase_b"], ":3: row has 3 fields"),
    ([HEADER, _row(1, K1, "phase_a"), _row(1, K1, "phase_a")], ":3: duplicate karman1 phase_a"),
    # a stream outside the configured layout
    ([HEADER, _row(1, K1, "phase_a"), _row(1, "karman4", "phase_a")],
     ":3: stream 'karman4' is outside the layout (karman1, karman2, karman3)"),
    ([HEADER, _row(1, "threephase/karman1", "phase_a")],
     ":2: stream 'threephase/karman1' carries the wire prefix"),
    # missing phase_a
    ([HEADER, _row(1, K1, "phase_a"), _row(1, K2, "phase_b")],
     ":3: stream karman2 has phase_b but no phase_a at time 1"),
    # mixed layouts: phase_b appears, a stream disappears, a truncated last cycle
    ([HEADER, _row(1, K1, "phase_a"), _row(2, K1, "phase_a"), _row(2, K1, "phase_b")],
     ":3: mixed layouts: the cycle at time 2 holds karman1 phase_a+phase_b, but the first "
     "cycle (line 2) holds karman1 phase_a"),
    ([HEADER, _row(1, K1, "phase_a"), _row(1, K2, "phase_a"), _row(2, K2, "phase_a")],
     ":4: mixed layouts: the cycle at time 2 holds karman2 phase_a"),
    ([HEADER, *[_row(t, k, "phase_a") for t in (1, 2) for k in (K1, K2, K3)],
      _row(3, K1, "phase_a"), _row(3, K2, "phase_a")],
     ":8: mixed layouts"),
    ([HEADER, "1.5," + _row(1, K1, "phase_a").split(",", 1)[1]], ":2: column time"),
    ([HEADER], "no data rows"),
    ([], ":1: empty file"),
])
def test_bad_files_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    csv = _write(tmp_path / "bad.csv", lines)
    with pytest.raises(KarmanCsvError) as err:
        read_recording(csv)
    assert str(csv) in str(err.value)
    assert message in str(err.value)


def test_missing_file_and_garbage_gzip(tmp_path: Path) -> None:
    with pytest.raises(KarmanCsvError, match="cannot read"):
        read_recording(tmp_path / "absent.csv")
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(KarmanCsvError, match="unreadable"):
        read_recording(bad)


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    csv = _write(tmp_path / "r.csv", [HEADER, _row(1000, K1, "phase_a"),
                                      _row(1000, K1, "phase_b", "900")])
    rec = read_recording(csv)
    out = tmp_path / "again.csv.gz"
    assert write_recording(out, rec.cycles, with_sequence=False, phase_b=True) == 2
    assert read_recording(out).cycles == rec.cycles
    # Reproducible bytes: no file name or mtime in the gzip header.
    first = out.read_bytes()
    write_recording(out, rec.cycles, with_sequence=False, phase_b=True)
    assert out.read_bytes() == first
    # The reference layout: phase_a only, bare stream names.
    plain = tmp_path / "plain.csv"
    assert write_recording(plain, rec.cycles) == 1
    assert plain.read_text().splitlines()[1].startswith("1000,karman1,phase_a,")


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.sampled_from(list("0123456789.,-e_abphskmrn\" \n")),
                        max_size=60), max_size=6))
def test_fuzzed_rows_parse_or_fail_clearly(tmp_path: Path, rows: list[str]) -> None:
    csv = tmp_path / "fuzz.csv"
    csv.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    try:
        rec = read_recording(csv)
    except KarmanCsvError as exc:
        assert str(exc).startswith(str(csv))
        assert "\n" not in str(exc)
    else:
        assert rec.cycles
