"""The socket server: its mode, its connection limit, and that it cleans up."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from spark_slurm.daemon.peers import Peer
from spark_slurm.daemon.server import SocketServer
from spark_slurm.errors import ConfigError


def test_server_turns_away_connections_beyond_its_limit(tmp_path: Path) -> None:
    release = threading.Event()

    class Slow:
        def handle_line(self, line: bytes, peer: Peer) -> dict[str, object]:
            release.wait(10)
            return {"ok": True, "uid": peer.uid}

        def handle_oversized(self, peer: Peer, limit: int) -> dict[str, object]:
            return {"ok": False}

    server = SocketServer(tmp_path / "s.sock", Slow(), max_connections=1, mode=0o600)
    server.start()
    try:
        first = socket.socket(socket.AF_UNIX)
        first.connect(str(tmp_path / "s.sock"))
        first.sendall(b'{"op": "status"}\n')
        second = socket.socket(socket.AF_UNIX)
        second.connect(str(tmp_path / "s.sock"))
        assert json.loads(second.makefile("rb").readline())["error"]["code"] == "busy"
        second.close()
        release.set()
        assert json.loads(first.makefile("rb").readline()) == {"ok": True, "uid": os.getuid()}
        first.close()
        assert oct((tmp_path / "s.sock").stat().st_mode & 0o777) == "0o600"
    finally:
        release.set()
        server.stop()
    assert not (tmp_path / "s.sock").exists()


def test_a_socket_path_too_long_for_af_unix_is_a_config_error_naming_it(tmp_path: Path) -> None:
    class Never:
        def handle_line(self, line: bytes, peer: Peer) -> dict[str, object]:
            raise AssertionError("no client can connect")

        def handle_oversized(self, peer: Peer, limit: int) -> dict[str, object]:
            raise AssertionError("no client can connect")

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = deep / "sparkd.sock"
    server = SocketServer(path, Never(), max_connections=1, mode=0o600)
    with pytest.raises(ConfigError) as err:
        server.start()
    assert str(path) in err.value.message and "at most 107" in err.value.message
    assert err.value.exit_code == 2
    assert not deep.exists()  # refused before anything was made
    fits = tmp_path / "ok.sock"  # and a short one still binds
    ok = SocketServer(fits, Never(), max_connections=1, mode=0o600)
    ok.start()
    try:
        assert fits.is_socket()
    finally:
        ok.stop()


def test_stopping_at_once_after_start_leaves_no_thread_error(tmp_path: Path) -> None:
    """sparkd stops at once when its start-up fails after the socket is up; the accept
    thread must then end quietly, not die on the closed socket."""
    class Never:
        def handle_line(self, line: bytes, peer: Peer) -> dict[str, object]:
            raise AssertionError("no client connects")

        def handle_oversized(self, peer: Peer, limit: int) -> dict[str, object]:
            raise AssertionError("no client connects")

    errors: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        for i in range(40):
            server = SocketServer(tmp_path / f"s{i}.sock", Never(), max_connections=1,
                                  mode=0o600, scheduler_path=tmp_path / f"p{i}.sock")
            server.start()
            server.stop()
    finally:
        threading.excepthook = previous
    assert errors == []
