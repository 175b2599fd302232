"""The socket server: its mode, its connection limit, and that it cleans up."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from spark_slurm.daemon.peers import Peer
from spark_slurm.daemon.server import SocketServer


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
