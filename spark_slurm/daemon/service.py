"""Turns request lines into replies: parse, check authority, run the op, record refusals.

Every request that is refused — malformed, oversized, unknown, from the wrong
peer, or denied by policy — is itself recorded as a `reject` PER before the
error reply goes out, so the ledger holds 100 % of what was asked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from spark_slurm.daemon.peers import Peer
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.requests import Request, parse_request
from spark_slurm.errors import BadRequest, GpuError

log = logging.getLogger("sparkd.service")

Observer = Callable[[str, float], None]


class Service:
    """The daemon's request handler (the socket server's LineHandler)."""

    def __init__(self, pipeline: Pipeline, *, status: Callable[[], dict[str, Any]],
                 ingest: Callable[[], dict[str, Any]] | None = None,
                 observe: Observer | None = None) -> None:
        self.pipeline = pipeline
        self.status = status
        self.ingest = ingest
        self.observe = observe

    def _raw_reject(self, peer: Peer, op: str, reason: str, extra: dict[str, Any]) -> Any:
        body = {"v": 1, "node": self.pipeline.node, "source": "socket", "op": op,
                "code": "bad-request", "reason": reason,
                "requester": {"uid": peer.uid, "user": peer.user, "role": "unknown"}, **extra}
        return self.pipeline.writer.commit("reject", body)

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, Any]:
        reason = f"request exceeds {limit} bytes; connection closed"
        receipt = self._raw_reject(peer, "unknown", reason, {"limit_bytes": limit})
        return {"ok": False, "error": {"code": "bad-request", "message": reason},
                "seq": receipt.seq, "hash": receipt.hash}

    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            preview = line[:200].decode("utf-8", errors="replace")
            receipt = self._raw_reject(peer, "unknown", exc.message, {"raw": preview})
            return {"ok": False, "error": {"code": "bad-request", "message": exc.message},
                    "seq": receipt.seq, "hash": receipt.hash}
        return self.handle(request, peer, Origin())

    def handle(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        """Run one checked request from a known peer (socket or journal)."""
        t0 = time.perf_counter()
        try:
            reply = self._dispatch(request, peer, origin)
        except Refusal as refusal:
            role = refusal.role or (
                "scheduler" if request.op in ("prolog", "epilog") else "unknown")
            _, receipt = self.pipeline.reject(request, peer, refusal, role, origin)
            reply = {"ok": False, "id": request.id, "seq": receipt.seq, "hash": receipt.hash,
                     "error": {"code": refusal.code, "message": refusal.reason}}
            if refusal.decision is not None:
                reply["decision"] = refusal.decision
        except GpuError as exc:
            log.error("%s job=%s: GPU failure: %s", request.op, request.job_id, exc)
            reply = {"ok": False, "id": request.id,
                     "error": {"code": "gpu-error", "message": str(exc)}}
        if self.observe is not None and request.op != "status":
            self.observe(request.op, time.perf_counter() - t0)
        return reply

    def _dispatch(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        op = request.op
        if op == "status":
            return {"ok": True, "id": request.id, **self.status()}
        authority = self.pipeline.authority()
        if op in ("prolog", "epilog", "ingest") and not authority.is_scheduler(peer):
            raise Refusal("forbidden", f"{op} is only accepted from root or the SlurmUser, "
                          f"not uid {peer.uid} (pid {peer.pid})")
        if op == "prolog":
            return self.pipeline.prolog(request, peer, origin)
        if op == "epilog":
            return self.pipeline.epilog(request, peer, origin)
        if op == "cap":
            return self.pipeline.cap(request, peer, origin)
        if op == "ingest":
            if self.ingest is None:
                raise Refusal("bad-request", "ingest is not available on this daemon")
            return {"ok": True, "id": request.id, **self.ingest()}
        raise Refusal("bad-request", f"unknown op {op!r}")


def pid_rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process in KiB, from /proc (0 if unknown)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0
