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
from spark_slurm.daemon.peers import Authority, Peer, user_name
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.ratelimit import RefusalLimiter
from spark_slurm.daemon.requests import Request, parse_request
from spark_slurm.errors import BadRequest, GpuError

log = logging.getLogger("sparkd.service")

Observer = Callable[[str, float], None]
IntentHandler = Callable[[Request, Peer, Origin], dict[str, Any]]


class Service:
    """The daemon's request handler (the socket server's LineHandler)."""

    def __init__(self, pipeline: Pipeline, *, status: Callable[[], dict[str, Any]],
                 ingest: Callable[[], dict[str, Any]] | None = None,
                 observe: Observer | None = None,
                 limiter: RefusalLimiter | None = None,
                 rotate_key: Callable[[], dict[str, Any]] | None = None,
                 intent: IntentHandler | None = None) -> None:
        self.pipeline = pipeline
        self.intent = intent
        self.status = status
        self.ingest = ingest
        self.rotate_key = rotate_key
        self.observe = observe
        self.limiter = limiter

    def _limiter_for(self, peer: Peer, authority: Authority) -> RefusalLimiter | None:
        """The refusal limiter that applies to `peer`: none for root and the SlurmUser."""
        return None if self.limiter is None or authority.is_scheduler(peer) else self.limiter

    @staticmethod
    def _limited(limiter: RefusalLimiter, peer: Peer, op: str,
                 request_id: Any = None) -> dict[str, Any] | None:
        """The `rate-limited` reply when `peer` has no refusal budget left (counted)."""
        wait_s = limiter.retry_after(peer.uid)
        if wait_s is None:
            return None
        limiter.suppress(peer.uid, op)
        reply: dict[str, Any] = {"ok": False, "error": {
            "code": "rate-limited",
            "message": f"too many refused requests from uid {peer.uid}; retry in "
                       f"{max(wait_s, 0.1):.1f} s (this request is counted in a summary "
                       "record, not recorded on its own)"}}
        if request_id is not None:
            reply["id"] = request_id
        return reply

    def flush_refusals(self) -> list[ReceiptLike]:
        """Record what the limiter counted: one `reject` PER per uid since last time."""
        if self.limiter is None:
            return []
        receipts = []
        pending = self.limiter.drain()
        for i, s in enumerate(pending):
            try:
                receipts.append(self._commit_reject(
                    s.uid, "*", "rate-limited",
                    f"{s.count} request(s) from uid {s.uid} answered rate-limited after its "
                    "refusal budget ran out",
                    {"suppressed": {"count": s.count, "first_ns": s.first_ns,
                                    "last_ns": s.last_ns, "ops": s.ops}}))
            except BaseException:
                self.limiter.restore(pending[i:])
                raise
        return receipts

    def _commit_reject(self, uid: int, op: str, code: str, reason: str,
                       extra: dict[str, Any]) -> ReceiptLike:
        """A `reject` PER for what never became a checked Request (raw line, or a count)."""
        body = {"v": 1, "node": self.pipeline.node, "source": "socket", "op": op,
                "code": code, "reason": reason,
                "requester": {"uid": uid, "user": user_name(uid), "role": "unknown"}, **extra}
        return self.pipeline.writer.commit("reject", body)

    def _refuse_raw(self, peer: Peer, reason: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Refuse a line that is no request at all: recorded, or counted when out of budget."""
        limiter = self._limiter_for(peer, self.pipeline.authority())
        if limiter is not None and (limited := self._limited(limiter, peer, "unknown")):
            return limited
        receipt = self._commit_reject(peer.uid, "unknown", "bad-request", reason, extra)
        if limiter is not None:
            limiter.refused(peer.uid)
        return {"ok": False, "error": {"code": "bad-request", "message": reason},
                "seq": receipt.seq, "hash": receipt.hash}

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, Any]:
        return self._refuse_raw(peer, f"request exceeds {limit} bytes; connection closed",
                                {"limit_bytes": limit})

    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            preview = line[:200].decode("utf-8", errors="replace")
            return self._refuse_raw(peer, exc.message, {"raw": preview})
        return self.handle(request, peer, Origin())

    def handle(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        """Run one checked request from a known peer (socket or journal)."""
        t0 = time.perf_counter()
        # looked up once per request (it reads the passwd entry of slurm_user)
        authority = None if request.op == "status" else self.pipeline.authority()
        limiter = None if authority is None else self._limiter_for(peer, authority)
        if limiter is not None and (
                limited := self._limited(limiter, peer, request.op, request.id)):
            return limited
        try:
            reply = self._dispatch(request, peer, origin, authority)
        except Refusal as refusal:
            if limiter is not None:
                limiter.refused(peer.uid)
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

    def _dispatch(self, request: Request, peer: Peer, origin: Origin,
                  authority: Authority | None) -> dict[str, Any]:
        op = request.op
        if authority is None:  # status: read-only, open to anyone
            return {"ok": True, "id": request.id, **self.status()}
        if op in ("prolog", "epilog", "ingest") and not authority.is_scheduler(peer):
            raise Refusal("forbidden", f"{op} is only accepted from root or the SlurmUser, "
                          f"not uid {peer.uid} (pid {peer.pid})")
        if op == "prolog":
            return self.pipeline.prolog(request, peer, origin)
        if op == "epilog":
            return self.pipeline.epilog(request, peer, origin)
        if op == "cap":
            return self.pipeline.cap(request, peer, origin)
        if op == "intent":  # validate-only mode: an external executor announces a change
            if self.intent is None:
                raise Refusal("bad-request", f"node {self.pipeline.node} has no validate-only "
                              "GPUs (executors.validate_only in sparkd.yaml)", role="executor")
            return self.intent(request, peer, origin)
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
