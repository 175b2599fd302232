"""Turns request lines into replies: parse, check authority, run the op, record refusals.

Every request that is refused — malformed, oversized, unknown, from the wrong
peer, or denied by policy — is itself recorded as a `reject` PER before the
error reply goes out, so the ledger holds 100 % of what was asked. A local user
who keeps being refused runs out of refusal budget (ratelimit.py): their further
requests are answered `rate-limited` and recorded as a count, one PER per flush.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from spark_slurm.daemon.contracts import ReceiptLike
from spark_slurm.daemon.peers import Peer, user_name
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.ratelimit import RefusalLimiter
from spark_slurm.daemon.requests import Request, parse_request
from spark_slurm.errors import BadRequest, GpuError

log = logging.getLogger("sparkd.service")

Observer = Callable[[str, float], None]


class Service:
    """The daemon's request handler (the socket server's LineHandler)."""

    def __init__(self, pipeline: Pipeline, *, status: Callable[[], dict[str, Any]],
                 ingest: Callable[[], dict[str, Any]] | None = None,
                 observe: Observer | None = None,
                 limiter: RefusalLimiter | None = None,
                 rotate_key: Callable[[], dict[str, Any]] | None = None) -> None:
        self.pipeline = pipeline
        self.status = status
        self.ingest = ingest
        self.rotate_key = rotate_key
        self.observe = observe
        self.limiter = limiter

    def _limited(self, peer: Peer, op: str, request_id: Any = None) -> dict[str, Any] | None:
        """The `rate-limited` reply when `peer` has no refusal budget left (counted)."""
        if self.limiter is None or self.pipeline.authority().is_scheduler(peer):
            return None
        wait_s = self.limiter.retry_after(peer.uid)
        if wait_s is None:
            return None
        self.limiter.suppress(peer.uid, op)
        reply: dict[str, Any] = {"ok": False, "error": {
            "code": "rate-limited",
            "message": f"too many refused requests from uid {peer.uid}; retry in "
                       f"{max(wait_s, 0.1):.1f} s (this request is counted in a summary "
                       "record, not recorded on its own)"}}
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def _spent(self, peer: Peer) -> None:
        if self.limiter is not None and not self.pipeline.authority().is_scheduler(peer):
            self.limiter.refused(peer.uid)

    def flush_refusals(self) -> list[ReceiptLike]:
        """Record what the limiter counted: one `reject` PER per uid since last time."""
        if self.limiter is None:
            return []
        receipts = []
        pending = self.limiter.drain()
        for i, s in enumerate(pending):
            body = {"v": 1, "node": self.pipeline.node, "source": "socket", "op": "*",
                    "code": "rate-limited",
                    "reason": f"{s.count} request(s) from uid {s.uid} answered rate-limited "
                              "after its refusal budget ran out",
                    "requester": {"uid": s.uid, "user": user_name(s.uid),
                                  "role": "unknown"},
                    "suppressed": {"count": s.count, "first_ns": s.first_ns,
                                   "last_ns": s.last_ns, "ops": s.ops}}
            try:
                receipts.append(self.pipeline.writer.commit("reject", body))
            except BaseException:
                self.limiter.restore(pending[i:])
                raise
        return receipts

    def _raw_reject(self, peer: Peer, op: str, reason: str, extra: dict[str, Any]) -> Any:
        body = {"v": 1, "node": self.pipeline.node, "source": "socket", "op": op,
                "code": "bad-request", "reason": reason,
                "requester": {"uid": peer.uid, "user": peer.user, "role": "unknown"}, **extra}
        return self.pipeline.writer.commit("reject", body)

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, Any]:
        limited = self._limited(peer, "unknown")
        if limited is not None:
            return limited
        reason = f"request exceeds {limit} bytes; connection closed"
        receipt = self._raw_reject(peer, "unknown", reason, {"limit_bytes": limit})
        self._spent(peer)
        return {"ok": False, "error": {"code": "bad-request", "message": reason},
                "seq": receipt.seq, "hash": receipt.hash}

    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            limited = self._limited(peer, "unknown")
            if limited is not None:
                return limited
            preview = line[:200].decode("utf-8", errors="replace")
            receipt = self._raw_reject(peer, "unknown", exc.message, {"raw": preview})
            self._spent(peer)
            return {"ok": False, "error": {"code": "bad-request", "message": exc.message},
                    "seq": receipt.seq, "hash": receipt.hash}
        return self.handle(request, peer, Origin())

    def handle(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        """Run one checked request from a known peer (socket or journal)."""
        t0 = time.perf_counter()
        if request.op != "status":
            limited = self._limited(peer, request.op, request.id)
            if limited is not None:
                return limited
        try:
            reply = self._dispatch(request, peer, origin)
        except Refusal as refusal:
            self._spent(peer)
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
        if op == "rotate-key":
            if peer.uid != 0:
                raise Refusal("forbidden", f"rotate-key is only accepted from root, not uid "
                              f"{peer.uid} (pid {peer.pid})")
            if self.rotate_key is None:
                raise Refusal("bad-request", "this daemon has no signing key to rotate")
            return {"ok": True, "id": request.id, **self.rotate_key()}
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
