"""ZeroMQ sockets for the Karman stream: the publisher binds, consumers connect.

One frame per message (topic bytes + payload). The publisher is an XPUB socket so
it can see subscriptions arrive; replaying to a subscriber that has not yet
joined would silently lose the first frames (ZeroMQ's slow-joiner behaviour).
"""

from __future__ import annotations

import time
from typing import Any

from spark_slurm.errors import KarmanError


def _zmq() -> Any:
    import zmq  # noqa: PLC0415 - lazy: only stream users pay for ZeroMQ

    return zmq


class Publisher:
    """A bound XPUB socket sending one-frame Karman messages; never blocks on send."""

    def __init__(self, bind: str, sndhwm: int = 100_000) -> None:
        zmq = _zmq()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, 1000)
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise KarmanError(f"cannot bind Karman publisher to {bind}: {exc}") from exc
        self.endpoint: str = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.subscriptions = 0
        self.dropped = 0

    def _drain_subscriptions(self, timeout_ms: int) -> None:
        zmq = _zmq()
        while self._sock.poll(timeout_ms, zmq.POLLIN):
            msg = self._sock.recv()
            if msg[:1] == b"\x01":
                self.subscriptions += 1
            timeout_ms = 0

    def wait_for_subscriber(self, timeout_s: float) -> bool:
        """Block until a subscriber has joined (or the timeout passes); True if one has."""
        deadline = time.monotonic() + timeout_s
        while self.subscriptions == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._drain_subscriptions(int(min(left, 0.1) * 1000) + 1)
        return True

    def send(self, frame: bytes) -> bool:
        """Queue one frame; False (and counted) when the queue is full."""
        zmq = _zmq()
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        return True

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


class FrameReceiver:
    """A connected SUB socket receiving raw frames (topic prefix still attached)."""

    def __init__(self, endpoint: str, topic: str, rcvhwm: int = 100_000,
                 all_topics: bool = True) -> None:
        zmq = _zmq()
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Subscribe to everything when asked so frames of other topics can be counted.
        self._sock.setsockopt(zmq.SUBSCRIBE, b"" if all_topics else topic.encode())
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise KarmanError(f"cannot connect to Karman endpoint {endpoint}: {exc}") from exc

    def recv(self, timeout_ms: int) -> bytes | None:
        """The next frame, or None when none arrived within the timeout."""
        if not self._sock.poll(timeout_ms, self._zmq.POLLIN):
            return None
        frame: bytes = self._sock.recv()
        return frame

    def recv_nowait(self) -> bytes | None:
        try:
            frame: bytes = self._sock.recv(self._zmq.NOBLOCK)
        except self._zmq.Again:
            return None
        return frame

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()
