"""spark-hook when sparkd is busy, cannot record, or the journal's disk is full."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm import hook
from spark_slurm.daemon.filemodes import FileModes
from spark_slurm.daemon.ingest import CursorFile, ReserveLines
from spark_slurm.daemon.reserve import Reserve

ENV = {"SLURM_JOB_ID": "77", "SLURM_JOB_UID": "1001", "SLURMD_NODENAME": "n1"}


class Scripted:
    """A socket server answering successive connections with successive replies."""

    def __init__(self, path: Path, replies: list[dict[str, Any]]) -> None:
        self.replies = list(replies)
        self.seen: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
                if reply.get("error", {}).get("code") != "busy":  # busy: nothing is read
                    data = b""
                    while b"\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.seen.append(json.loads(data))
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def sock_path() -> Iterator[Path]:
    short = Path("/tmp") / f"spkh-{os.urandom(4).hex()}.sock"
    yield short
    short.unlink(missing_ok=True)


def _cfg(tmp_path: Path, sock: Path, **over: Any) -> dict[str, Any]:
    cfg = {"socket": str(sock), "journal": str(tmp_path / "journal.jsonl"), "timeout_s": 2.0,
           "on_daemon_down": "fail_closed"}
    cfg.update(over)
    return cfg


def _entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_bytes().split(b"\0", 1)[0].decode()
    return [json.loads(line) for line in text.splitlines() if line]


BUSY = {"ok": False, "error": {"code": "busy", "message": "all slots in use"}}


def test_busy_is_retried_within_the_deadline(tmp_path: Path, sock_path: Path) -> None:
    daemon = Scripted(sock_path, [BUSY, BUSY, BUSY, {"ok": True, "seq": 5}])
    try:
        assert hook.run("prolog", ENV, _cfg(tmp_path, sock_path), io.StringIO()) == 0
    finally:
        daemon.close()
    assert len(daemon.seen) == 1 and daemon.seen[0]["job_id"] == "77"
    assert _entries(tmp_path / "journal.jsonl") == []


def test_busy_until_the_deadline_is_journaled_and_fails_as_configured(
        tmp_path: Path, sock_path: Path) -> None:
    daemon = Scripted(sock_path, [BUSY])
    err = io.StringIO()
    t0 = time.monotonic()
    try:
        code = hook.run("epilog", ENV, _cfg(tmp_path, sock_path, timeout_s=0.5), err)
    finally:
        daemon.close()
    assert code == 1 and time.monotonic() - t0 < 5
    [entry] = _entries(tmp_path / "journal.jsonl")
    assert entry["op"] == "epilog" and entry["hook_exit"] == "fail_closed"
    assert "busy" in entry["error"] and "retried" in entry["error"]


def test_an_answer_without_a_record_is_journaled(tmp_path: Path, sock_path: Path) -> None:
    daemon = Scripted(sock_path, [{"ok": False, "error": {
        "code": "disk-full", "message": "the ledger's filesystem is full"}}])
    err = io.StringIO()
    try:
        assert hook.run("prolog", ENV, _cfg(tmp_path, sock_path,
                                            on_daemon_down="fail_open"), err) == 0
    finally:
        daemon.close()
    [entry] = _entries(tmp_path / "journal.jsonl")
    assert entry["error"].startswith("disk-full:") and entry["hook_exit"] == "fail_open"
    assert "not recorded by sparkd" in err.getvalue()


def test_an_epilog_whose_restore_is_recorded_already_succeeds(tmp_path: Path,
                                                              sock_path: Path) -> None:
    daemon = Scripted(sock_path, [{"ok": False, "seq": 12, "error": {
        "code": "already-restored", "message": "job 77: its restore is already recorded"}}])
    try:
        assert hook.run("epilog", ENV, _cfg(tmp_path, sock_path), io.StringIO()) == 0
        assert hook.run("prolog", ENV, _cfg(tmp_path, sock_path), io.StringIO()) == 1
    finally:
        daemon.close()
    assert _entries(tmp_path / "journal.jsonl") == []


def test_a_full_journal_disk_uses_the_reserve(tmp_path: Path, sock_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.symlink_to("/dev/full")  # every write fails with ENOSPC
    reserve = Reserve(journal, 4096, FileModes())
    assert reserve.ensure()
    assert reserve.path.stat().st_size == 4096 and not reserve.used()
    cfg = _cfg(tmp_path, sock_path)  # no daemon either
    err = io.StringIO()
    for _ in range(2):
        assert hook.run("prolog", ENV, cfg, err) == 1
    assert f"journaled to {reserve.path}" in err.getvalue()
    entries = _entries(reserve.path)
    assert [e["op"] for e in entries] == ["prolog", "prolog"]
    assert reserve.path.stat().st_size == 4096  # written in place, nothing allocated
    # sparkd reads it up to the first NUL, then swaps in a fresh one under the lock
    lines = ReserveLines(reserve.path, CursorFile(tmp_path / "cur"), None)
    got = [line for *_, line in lines.lines() if line]
    assert [json.loads(line)["id"] for line in got] == [e["id"] for e in entries]
    old = reserve.path.stat().st_ino
    with reserve.locked() as present:
        assert present and reserve.used() and reserve.recycle()
    assert reserve.path.stat().st_ino != old and not reserve.used()


def test_a_full_reserve_fails_closed_with_the_reason(tmp_path: Path, sock_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    journal.symlink_to("/dev/full")
    Reserve(journal, 64, FileModes()).ensure()  # too small for one entry
    err = io.StringIO()
    assert hook.run("epilog", ENV, _cfg(tmp_path, sock_path, on_daemon_down="fail_open"),
                    err) == 1
    assert "reserve" in err.getvalue() and "failing closed" in err.getvalue()


def test_status_fails_with_the_daemons_problems(tmp_path: Path, sock_path: Path) -> None:
    daemon = Scripted(sock_path, [BUSY, {"ok": True, "healthy": False, "problems": [
        "disk low: /var/lib/spark has 900 KiB free"]}])
    out = io.StringIO()
    try:
        assert hook.check_status(_cfg(tmp_path, sock_path), out) == 1
    finally:
        daemon.close()
    assert out.getvalue().strip() == "sparkd unhealthy: disk low: /var/lib/spark has 900 KiB free"


def test_a_full_listen_queue_counts_as_busy(tmp_path: Path, sock_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(0)  # nobody accepts: the queue fills at once
    fillers = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(sock_path))
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        with pytest.raises(hook.Busy):
            hook.ask_daemon(str(sock_path), {"op": "status"}, 0.5)
        with pytest.raises(hook.Unreachable, match=r"listen queue full.*retried"):
            hook.ask_until(str(sock_path), {"op": "status"}, time.monotonic() + 0.4)
    finally:
        for s in fillers:
            s.close()
        server.close()
