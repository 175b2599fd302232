"""Recorded-data CSV: strict reading with errors that name the line, exact writing."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spark_slurm.errors import KarmanCsvError
from spark_slurm.karman.csvfile import COLUMNS, read_recording, write_recording

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


def test_rows_group_into_cycles_and_phase_a_only_is_sent_as_both(tmp_path: Path) -> None:
    csv = _write(tmp_path / "r.csv", [
        HEADER,
        _row(1000, "k1", "phase_a"), _row(1000, "k1", "phase_b", "900"),
        _row(1000, "k2", "phase_a", "500"),
        _row(1017, "k1", "phase_a"), _row(1017, "k1", "phase_b"),
    ])
    rec = read_recording(csv)
    assert not rec.has_sequence
    assert [c.time_ns for c in rec.cycles] == [1_000_000_000, 1_017_000_000]
    first = rec.cycles[0]
    assert [s.name for s in first.streams] == ["k1", "k2"]
    assert first.streams[0].phase_b is not None
    assert first.streams[0].phase_b.real_power_w == 900.0
    assert first.streams[1].phase_b == first.streams[1].phase_a
    assert first.real_power_w() == pytest.approx(1000.5 + 900 + 500 + 500)


def test_gzip_and_sequence_numbers(tmp_path: Path) -> None:
    path = tmp_path / "r.csv.gz"
    text = "\n".join([HEADER + ",sequence_number", _row(5, "k1", "phase_a", seq="17"),
                      _row(6, "k1", "phase_a", seq="18")]) + "\n"
    path.write_bytes(gzip.compress(text.encode()))
    rec = read_recording(path)
    assert rec.has_sequence
    assert [c.seq for c in rec.cycles] == [17, 18]


@pytest.mark.parametrize(("lines", "message"), [
    ([HEADER.replace(",real_power", "")], ":1: header lacks column(s) real_power"),
    ([HEADER, _row(1, "k1", "phase_a"), _row(2, "k1", "phase_a", "12x")],
     ":3: column real_power: '12x' is not a number"),
    ([HEADER, _row(1, "k1", "phase_a", "nan")], ":2: column real_power: 'nan' is not a finite"),
    ([HEADER, _row(5, "k1", "phase_a"), _row(4, "k1", "phase_a")],
     ":3: time 4 is earlier than the previous row's 5"),
    ([HEADER, _row(1, "k1", "phase_c")], ":2: column phase: 'phase_c'"),
    ([HEADER, _row(1, "k1", "phase_a"), "1,k1,phase_b"], ":3: row has 3 fields"),
    ([HEADER, _row(1, "k1", "phase_a"), _row(1, "k1", "phase_a")], ":3: duplicate k1 phase_a"),
    ([HEADER, _row(1, "k1", "phase_b")], ":2: stream k1 has phase_b but no phase_a"),
    ([HEADER, "1.5," + _row(1, "k", "phase_a").split(",", 1)[1]], ":2: column time"),
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
    csv = _write(tmp_path / "r.csv", [HEADER, _row(1000, "k1", "phase_a"),
                                      _row(1000, "k1", "phase_b", "900")])
    rec = read_recording(csv)
    out = tmp_path / "again.csv.gz"
    assert write_recording(out, rec.cycles, with_sequence=False) == 2
    assert read_recording(out).cycles == rec.cycles
    # Reproducible bytes: no file name or mtime in the gzip header.
    first = out.read_bytes()
    write_recording(out, rec.cycles, with_sequence=False)
    assert out.read_bytes() == first


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.sampled_from(list("0123456789.,-e_abphsk\" \n")),
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
