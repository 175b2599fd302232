"""The unix socket: one JSON request per line in, one JSON reply per line out.

Each connection gets its own thread, so a slow client never holds up the
prolog of another job. Lines longer than the limit are answered with an error
and the connection is closed (the rest of an oversized line is never parsed).
The kernel, not the request, says who the peer is (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol

from spark_slurm.daemon.peers import Peer, peer_of

log = logging.getLogger("sparkd.server")


class LineHandler(Protocol):
    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]: ...

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, Any]: ...


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, sort_keys=True, separators=(",", ":"), default=str).encode() + b"\n"


class SocketServer:
    """Listens on a unix socket path and serves each connection in a thread."""

    def __init__(self, path: Path, handler: LineHandler, *, mode: int = 0o666,
                 max_request_bytes: int = 65536, idle_timeout_s: float = 60.0,
                 max_connections: int = 256) -> None:
        self.path = path
        self._slots = threading.BoundedSemaphore(max_connections)
        self.handler = handler
        self.mode = mode
        self.max_request_bytes = max_request_bytes
        self.idle_timeout_s = idle_timeout_s
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.connections = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise OSError(f"{self.path} exists and is not a socket")
            self.path.unlink()  # a stale socket from a killed daemon
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock.bind(str(tmp))
        os.chmod(tmp, self.mode)
        os.replace(tmp, self.path)  # appears with its final mode, never briefly open
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="socket-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            self.connections += 1
            if not self._slots.acquire(blocking=False):
                # Too many open connections (a flood or stuck clients): say so and hang up
                # rather than run out of threads; nothing was read, so nothing is recorded.
                with contextlib.suppress(OSError), conn:
                    conn.sendall(encode_reply({"ok": False, "error": {
                        "code": "busy", "message": "too many open connections; retry"}}))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="socket-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        finally:
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            try:
                peer = peer_of(conn)
            except OSError as exc:
                log.warning("cannot identify peer: %s", exc)
                return
            conn.settimeout(self.idle_timeout_s)
            reader = conn.makefile("rb")
            try:
                while not self._stopping.is_set():
                    line = reader.readline(self.max_request_bytes + 1)
                    if not line:
                        return
                    content = len(line) - 1 if line.endswith(b"\n") else len(line)
                    if content > self.max_request_bytes:
                        reply = self.handler.handle_oversized(peer, self.max_request_bytes)
                        conn.sendall(encode_reply(reply))
                        return
                    line = line.rstrip(b"\r\n")
                    if not line.strip():
                        continue
                    try:
                        reply = self.handler.handle_line(line, peer)
                    except Exception as exc:  # never let one request take the daemon down
                        log.exception("request from uid %s failed", peer.uid)
                        reply = {"ok": False, "error": {"code": "internal",
                                                        "message": f"internal error: {exc}"}}
                    conn.sendall(encode_reply(reply))
            except (OSError, TimeoutError):
                return
            finally:
                reader.close()
