"""JSON Lines ingest: complete lines only, cursor with inode, rotation starts over."""

from __future__ import annotations

import os
from pathlib import Path

from spark_slurm.daemon.ingest import Cursor, CursorFile, LineFile, ledger_cursor
from spark_slurm.ledger import Ledger


def test_torn_last_line_waits_and_the_cursor_persists(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    lines = LineFile(path, CursorFile(tmp_path / "cur"), None)
    got = lines.lines()
    assert [line for *_, line in got] == [b'{"a": 1}', b'{"b": 2}']
    inode, offset, end, _ = got[-1]
    assert (offset, end) == (9, 18)
    lines.advance(inode, end)
    assert lines.lines() == []  # the torn line waits for its newline
    with path.open("ab") as fh:
        fh.write(b"3}\n")
    again = LineFile(path, CursorFile(tmp_path / "cur"), None)  # a restart reads the cursor
    assert [line for *_, line in again.lines()] == [b'{"c": 3}']


def test_rotation_or_truncation_starts_from_the_top(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    path.write_bytes(b"one\ntwo\n")
    cursor = CursorFile(tmp_path / "cur")
    lines = LineFile(path, cursor, None)
    inode, _, end, _ = lines.lines()[-1]
    lines.advance(inode, end)
    os.unlink(path)
    path.write_bytes(b"three\n")  # a new file (new inode) after rotation
    assert [line for *_, line in LineFile(path, cursor, None).lines()] == [b"three"]
    path.write_bytes(b"x\n")  # same inode, shorter than the cursor: truncated
    trunc = LineFile(path, cursor, Cursor(os.stat(path).st_ino, 100))
    assert [line for *_, line in trunc.lines()] == [b"x"]


def test_the_ledger_cursor_wins_over_a_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"one\ntwo\nthree\n")
    cursor = CursorFile(tmp_path / "cur")
    ino = os.stat(path).st_ino
    cursor.save(Cursor(ino, 4))  # a crash after committing "two" but before saving
    lines = LineFile(path, cursor, Cursor(ino, 8))
    assert [line for *_, line in lines.lines()] == [b"three"]
    assert LineFile(tmp_path / "missing", cursor, None).lines() == []


def test_restart_resumes_after_the_newest_line_the_ledger_recorded(tmp_path: Path) -> None:
    """Without a cursor file (lost in a crash) the ledger says where ingest got to:
    the end of the newest journal line recorded, not the oldest (which would ingest
    lines again), and never a line that came from the spool or the socket."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"one\ntwo\nthree\nfour\n")
    ino = os.stat(path).st_ino
    with Ledger.open(tmp_path / "l.db", node="n1") as ledger:
        for offset, end in ((0, 4), (4, 8), (8, 14)):
            ledger.append("cap", {"v": 1, "source": "journal",
                                  "journal": {"inode": ino, "offset": offset, "end": end}})
        ledger.append("cap", {"v": 1, "source": "socket"})
        ledger.append("admission", {"v": 1, "source": "spool",
                                    "spool": {"inode": ino, "offset": 0, "end": 2}})
        start = ledger_cursor(ledger, "journal", ["cap", "restore", "reject"])
    assert start == Cursor(ino, 14)
    lines = LineFile(path, CursorFile(tmp_path / "no-cursor-file"), start)
    assert [line for *_, line in lines.lines()] == [b"four"]


def test_a_batch_of_journal_lines_leaves_the_cursor_after_its_last_line(tmp_path: Path) -> None:
    """Catch-up after an outage ingests many journal lines in one write: the ledger's
    pointer must name the newest of them, or a restart would ingest the rest again."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"one\ntwo\nthree\nfour\n")
    ino = os.stat(path).st_ino
    with Ledger.open(tmp_path / "l.db", node="n1") as ledger:
        ledger.append_many([("cap", {"v": 1, "source": "journal",
                                     "journal": {"inode": ino, "offset": offset, "end": end}})
                            for offset, end in ((0, 4), (4, 8), (8, 14))])
        start = ledger_cursor(ledger, "journal", ["cap", "restore", "reject"])
    assert start == Cursor(ino, 14)
    lines = LineFile(path, CursorFile(tmp_path / "no-cursor-file"), start)
    assert [line for *_, line in lines.lines()] == [b"four"]
