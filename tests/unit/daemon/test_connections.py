"""The connection gate and the server: reserve, per-uid quota, rate, idle deadline."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.connections import ConnectionGate, ConnectionLimits
from spark_slurm.daemon.peers import Peer
from spark_slurm.daemon.server import SocketServer

ROOT, USER, OTHER = 0, 1000, 1001


def _gate(clock: ManualClock, **limits: float) -> ConnectionGate:
    base = {"max_connections": 10, "reserved": 3, "per_uid": 4, "rate_per_s": 1.0,
            "burst": 100, "idle_timeout_s": 5.0}
    base.update(limits)
    return ConnectionGate(ConnectionLimits(**base),  # type: ignore[arg-type]
                          privileged=lambda uid: uid == ROOT, clock=clock)


def test_users_have_a_quota_and_can_never_take_the_reserve() -> None:
    gate = _gate(ManualClock())
    assert all(gate.admit(USER) is None for _ in range(4))
    assert "already holds 4" in (gate.admit(USER) or "")      # per-uid quota
    assert all(gate.admit(OTHER) is None for _ in range(3))
    assert "slots open to uid 1001" in (gate.admit(OTHER) or "")  # 7 = 10 - 3 reserved
    assert all(gate.admit(ROOT) is None for _ in range(3))    # the reserve is root's
    assert gate.admit(ROOT) is not None and gate.open == 10
    gate.release(USER)
    assert gate.admit(ROOT) is None                           # any free slot serves root
    assert gate.refused() == {"per-uid": 1, "pool": 2}
    counts = gate.tally.drain()
    assert [(c.uid, c.code, c.count) for c in counts] == [(0, "busy", 1), (1000, "busy", 1),
                                                          (1001, "busy", 1)]


def test_a_reconnect_loop_runs_out_of_tokens_and_they_come_back() -> None:
    clock = ManualClock()
    gate = _gate(clock, burst=5, rate_per_s=2.0)
    for _ in range(5):
        assert gate.admit(USER) is None
        gate.release(USER)  # closing does not refund: churn spends the bucket
    why = gate.admit(USER) or ""
    assert "retry in 0.50 s" in why
    assert gate.request(USER) is not None                     # requests spend it too
    assert gate.admit(ROOT) is None and gate.request(ROOT) is None  # never limited
    clock.advance(0.5)
    assert gate.admit(USER) is None
    clock.advance(3600)
    gate.release(USER)  # full again and nothing open: the bucket is forgotten
    assert gate.refused()["rate"] == 2


def test_timeouts_are_counted_and_users_tallied() -> None:
    gate = _gate(ManualClock())
    gate.timeout(USER, partial=True)
    gate.timeout(ROOT, partial=False)
    assert gate.timed_out == 2
    assert gate.refused() == {"partial-timeout": 1}


class Echo:
    def handle_line(self, line: bytes, peer: Peer) -> dict[str, object]:
        return {"ok": True, "uid": peer.uid, "line": line.decode()}

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, object]:
        return {"ok": False, "error": {"code": "bad-request"}}


def _short_path() -> Path:
    return Path("/tmp") / f"spk-gate-{os.urandom(4).hex()}.sock"


def _reply(sock: socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    reply: dict[str, object] = json.loads(data)
    return reply


def test_the_server_keeps_a_reserve_that_a_user_cannot_fill() -> None:
    path = _short_path()
    privileged = threading.Event()  # this process is root; flip what "root" means
    gate = ConnectionGate(ConnectionLimits(max_connections=4, reserved=2, per_uid=10,
                                           rate_per_s=0, idle_timeout_s=5),
                          privileged=lambda uid: privileged.is_set())
    server = SocketServer(path, Echo(), gate=gate)
    server.start()
    held = []
    try:
        for _ in range(2):  # as a "user": two idle connections fill the user share
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            held.append(s)
        deadline = time.monotonic() + 10
        while gate.open < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as third:
            third.connect(str(path))
            assert _reply(third)["error"] == {
                "code": "busy", "message": "all 2 connection slots open to uid 0 are in use"}
        privileged.set()  # now as the scheduler: the reserve is there
        with socket.socket(socket.AF_UNIX) as root:
            root.connect(str(path))
            root.sendall(b'{"op": "status"}\n')
            assert _reply(root)["ok"] is True
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_request_must_be_complete_within_the_idle_timeout() -> None:
    path = _short_path()
    gate = ConnectionGate(ConnectionLimits(idle_timeout_s=0.5), privileged=lambda uid: False)
    server = SocketServer(path, Echo(), gate=gate)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b'{"a"')
            s.settimeout(10)
            t0 = time.monotonic()
            closed = b""
            try:
                while True:  # trickle: each byte would reset a per-read timeout
                    s.sendall(b" ")
                    time.sleep(0.1)
                    if time.monotonic() - t0 > 8:
                        break
            except OSError:
                closed = b"closed"
            if not closed:
                closed = s.recv(10) or b"closed"
        assert closed == b"closed"
        assert gate.timed_out == 1 and gate.refused() == {"partial-timeout": 1}
        with socket.socket(socket.AF_UNIX) as s:  # pipelined lines each get an answer
            s.connect(str(path))
            s.sendall(b"one\ntwo\n")
            answers = s.makefile("rb")
            assert [json.loads(answers.readline())["line"] for _ in range(2)] == ["one", "two"]
    finally:
        server.stop()
