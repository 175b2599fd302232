"""A small client for sparkd's socket, used by `sparkctl status` and `sparkctl cap`.

One connection per call, one JSON line each way, with a timeout; an error reply
becomes `DaemonRefused` and an unreachable socket `DaemonUnavailable`, so the CLI
prints one clear line either way.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from spark_slurm.errors import DaemonRefused, DaemonUnavailable

DEFAULT_SOCKET = Path("/run/spark/sparkd.sock")


def exchange(data: bytes, socket_path: Path = DEFAULT_SOCKET, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes, return the raw reply line (tests also send deliberately bad bytes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(socket_path))
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot reach sparkd at {socket_path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(data)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            raise DaemonUnavailable(f"sparkd at {socket_path} did not answer: {exc}") from None
    finally:
        sock.close()
    if not reply:
        raise DaemonUnavailable(f"sparkd at {socket_path} closed the connection without a reply")
    return reply


def request(payload: dict[str, Any], socket_path: Path = DEFAULT_SOCKET,
            timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply object, whatever its `ok`."""
    data = exchange(json.dumps(payload).encode() + b"\n", socket_path, timeout_s)
    try:
        reply = json.loads(data)
    except ValueError:
        raise DaemonUnavailable(f"sparkd at {socket_path} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise DaemonUnavailable(f"sparkd at {socket_path} sent a malformed reply")
    return reply


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or DaemonRefused naming the daemon's error code and message."""
    if reply.get("ok"):
        return reply
    error = reply.get("error") or {}
    raise DaemonRefused(str(error.get("code", "error")), str(error.get("message", "refused")))


def status(socket_path: Path = DEFAULT_SOCKET) -> dict[str, Any]:
    """Daemon health, GPUs, governed jobs and the ledger head."""
    return checked(request({"op": "status"}, socket_path))


def cap(job_id: str, watts_per_gpu: float, reason: str | None = None,
        socket_path: Path = DEFAULT_SOCKET) -> dict[str, Any]:
    """Ask the daemon to change a running job's per-GPU cap (policy decides)."""
    payload: dict[str, Any] = {"op": "cap", "job_id": job_id, "watts_per_gpu": watts_per_gpu}
    if reason:
        payload["reason"] = reason
    return checked(request(payload, socket_path))


def rotate_key(socket_path: Path = DEFAULT_SOCKET) -> dict[str, Any]:
    """Ask the daemon (as root) to rotate its ledger's signing key."""
    return checked(request({"op": "rotate-key"}, socket_path, timeout_s=30.0))


def intent(gpus: list[int], watts_per_gpu: float, executor: str, *, job_id: str | None = None,
           deadline_s: float | None = None, reason: str | None = None,
           socket_path: Path = DEFAULT_SOCKET) -> dict[str, Any]:
    """Announce a limit an external executor is about to set (validate-only mode).

    Returns the reply whatever it says (`verdict` approve or deny): an executor that
    was denied may still need the decision, e.g. the watts the policy would allow."""
    payload: dict[str, Any] = {"op": "intent", "gpus": gpus, "watts_per_gpu": watts_per_gpu,
                               "executor": executor}
    if job_id is not None:
        payload["job_id"] = job_id
    if deadline_s is not None:
        payload["deadline_s"] = deadline_s
    if reason:
        payload["reason"] = reason
    return request(payload, socket_path)
