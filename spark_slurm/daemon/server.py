"""The unix socket: one JSON request per line in, one JSON reply per line out.

Each admitted connection gets its own thread, so a slow client never holds up
the prolog of another job; the connection gate (connections.py) decides who is
admitted, keeping slots in reserve for root and the SlurmUser. A request line
must be complete within the idle timeout of the connection's start or of the
previous reply, however slowly its bytes arrive. Lines longer than the limit
are answered with an error and the connection is closed (the rest of an
oversized line is never parsed). The kernel, not the request, says who the
peer is (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from spark_slurm.daemon.connections import ConnectionGate, ConnectionLimits
from spark_slurm.daemon.peers import Peer, supplementary_groups
from spark_slurm.errors import ConfigError

log = logging.getLogger("sparkd.server")

_UCRED = struct.Struct("3i")
BACKLOG = 1024  # the kernel caps it at net.core.somaxconn


class LineHandler(Protocol):
    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]: ...

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, Any]: ...


class FailureHandler(Protocol):
    def handle_failure(self, line: bytes, peer: Peer, exc: Exception) -> dict[str, Any]: ...


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, sort_keys=True, separators=(",", ":"), default=str).encode() + b"\n"


def busy_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": "busy", "message": message}}


class SocketServer:
    """Listens on a unix socket path (and the scheduler's own socket, when given) and
    serves each admitted connection in a thread."""

    def __init__(self, path: Path, handler: LineHandler, *, mode: int = 0o666,
                 max_request_bytes: int = 65536, gate: ConnectionGate | None = None,
                 max_connections: int = 256, scheduler_path: Path | None = None,
                 scheduler_owner: int | None = None) -> None:
        self.path = path
        self.scheduler_path = scheduler_path
        self.scheduler_owner = scheduler_owner
        self.handler = handler
        self.mode = mode
        self.max_request_bytes = max_request_bytes
        # without a gate (tests, tools): one flat pool, no reserve, no rate
        self.gate = gate or ConnectionGate(
            ConnectionLimits(max_connections=max_connections, reserved=0,
                             per_uid=max_connections, rate_per_s=0, refuse_per_s=0),
            privileged=lambda uid: uid == 0)
        self.idle_timeout_s = self.gate.limits.idle_timeout_s
        self._sock: socket.socket | None = None
        self._private: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.connections = 0
        self.paused_s = 0.0  # time the public socket was left to the kernel's queue

    def start(self) -> None:
        self._sock = _listen(self.path, self.mode)
        if self.scheduler_path is not None:
            self._private = _listen(self.scheduler_path, 0o600, self.scheduler_owner)
        self._thread = threading.Thread(target=self._accept, name="socket-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for sock, path in ((self._sock, self.path), (self._private, self.scheduler_path)):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept(self) -> None:
        """Accept from the scheduler's socket first, always; from the public one in
        batches, and not at all for a moment once users' connections are being turned
        away faster than `refuse_per_s`: the kernel's queue then holds (or refuses)
        them at no cost to the daemon, which keeps its CPU for the prologs."""
        try:
            self._accept_loop()
        except (OSError, ValueError):  # a socket closed under us (fd -1: ValueError)
            if not self._stopping.is_set():
                raise  # only `stop()` may close them; anything else is a real fault

    def _accept_loop(self) -> None:
        public = self._sock
        assert public is not None
        private = self._private
        poller = select.poll()
        for sock in (public, private):
            if sock is not None:
                sock.setblocking(False)
                poller.register(sock, select.POLLIN)
        paused_until = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if paused_until and now >= paused_until:
                poller.modify(public, select.POLLIN)
                paused_until = 0.0
            wait_ms = max(1, int((paused_until - now) * 1000)) if paused_until else 500
            try:
                ready = {fd for fd, _ in poller.poll(wait_ms)}
            except OSError:
                continue
            if self._stopping.is_set():
                return
            if private is not None and private.fileno() in ready:
                self._accept_from(private, limit=1 << 30)
            if not paused_until and public.fileno() in ready:
                pause = self._accept_from(public, limit=64)
                if pause > 0:
                    poller.modify(public, 0)
                    paused_until = time.monotonic() + pause
                    self.paused_s += pause

    def _accept_from(self, listener: socket.socket, limit: int) -> float:
        """Accept up to `limit` queued connections; seconds to leave the socket alone."""
        for _ in range(limit):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return 0.0
            except OSError as exc:
                if exc.errno in (24, 23):  # EMFILE/ENFILE: let connections drain first
                    log.error("accept: %s", exc)
                    return 0.05
                return 0.0
            conn.setblocking(True)
            self.connections += 1
            try:
                pid, uid, gid = _UCRED.unpack(conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except OSError as exc:
                log.warning("cannot identify peer: %s", exc)
                conn.close()
                continue
            refusal = self.gate.admit(uid)
            if refusal is not None:
                _turn_away(conn, refusal)
                pause = self.gate.refusal_pause()
                if pause > 0 and listener is self._sock:
                    return pause
                continue
            try:
                threading.Thread(target=self._serve, args=(conn, pid, uid, gid),
                                 name="socket-conn", daemon=True).start()
            except RuntimeError:  # no thread to be had: same answer as a full pool
                self.gate.release(uid)
                _turn_away(conn, "sparkd cannot start another connection thread")
        return 0.0

    def _serve(self, conn: socket.socket, pid: int, uid: int, gid: int) -> None:
        try:
            with conn:
                peer = Peer(uid=uid, gid=gid, pid=pid, groups=supplementary_groups(pid))
                self._serve_one(conn, peer)
        finally:
            self.gate.release(uid)

    def _serve_one(self, conn: socket.socket, peer: Peer) -> None:
        limit = self.max_request_bytes
        buf = bytearray()
        first = True  # admitting the connection already spent this request's token
        deadline = time.monotonic() + self.idle_timeout_s
        try:
            while not self._stopping.is_set():
                end = buf.find(b"\n")
                if end < 0 and len(buf) <= limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.gate.timeout(peer.uid, partial=bool(buf))
                        return
                    conn.settimeout(left)
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        self.gate.timeout(peer.uid, partial=bool(buf))
                        return
                    if chunk:
                        buf += chunk
                        continue
                    if not buf:
                        return  # closed between requests
                    end = len(buf)  # a last line without its newline: still a request
                if end < 0 or end > limit:
                    conn.settimeout(self.idle_timeout_s)
                    conn.sendall(encode_reply(self.handler.handle_oversized(peer, limit)))
                    return
                line = bytes(buf[:end]).rstrip(b"\r")
                del buf[:end + 1]
                conn.settimeout(self.idle_timeout_s)  # a reply the peer never reads
                conn.sendall(encode_reply(self._answer(line, peer, first)))
                first = False
                deadline = time.monotonic() + self.idle_timeout_s
        except OSError:
            return

    def _answer(self, line: bytes, peer: Peer, first: bool) -> dict[str, Any]:
        refusal = None if first else self.gate.request(peer.uid)
        if refusal is not None:
            return busy_reply(refusal)
        try:
            return self.handler.handle_line(line, peer)
        except Exception as exc:  # never let one request take the daemon down
            log.exception("request from uid %s failed", peer.uid)
            fallback = getattr(self.handler, "handle_failure", None)
            if fallback is not None:
                try:
                    reply: dict[str, Any] = fallback(line, peer, exc)
                    return reply
                except Exception:
                    log.exception("could not record the failed request either")
            return {"ok": False, "error": {"code": "internal",
                                           "message": f"internal error: {exc}"}}


# sun_path holds 108 bytes on Linux, the terminating NUL included
MAX_SOCKET_PATH = 107


def _listen(path: Path, mode: int, owner: int | None = None) -> socket.socket:
    """A listening socket at `path`, appearing with its final mode (and owner)."""
    tmp = path.with_name(f".s{os.getpid()}")  # bound first, then renamed into place
    size = max(len(os.fsencode(path)), len(os.fsencode(tmp)))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(f"socket path is {size} bytes; a unix socket path may be at most "
                          f"{MAX_SOCKET_PATH} (choose a shorter socket.path or "
                          "socket.scheduler_path)", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise OSError(f"{path} exists and is not a socket")
        path.unlink()  # a stale socket from a killed daemon
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock.bind(str(tmp))
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, owner, -1)
    os.replace(tmp, path)  # appears with its final mode, never briefly open
    sock.listen(BACKLOG)
    return sock


def _turn_away(conn: socket.socket, message: str) -> None:
    """One `busy` line without blocking the accept thread, then hang up. What the
    client already sent is read off first: closing over unread bytes would reset
    the connection and could cost the client the answer."""
    with contextlib.suppress(OSError), conn:
        conn.send(encode_reply(busy_reply(message)), socket.MSG_DONTWAIT)
        for _ in range(4):
            if not conn.recv(65536, socket.MSG_DONTWAIT):
                break


def raise_fd_limit(want: int = 65536) -> None:
    """Every connection, the ledger and the sampler need descriptors; a soft limit of
    1024 would let a burst of clients starve the daemon, so raise it (up to hard)."""
    import resource  # noqa: PLC0415 (only at start)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
