"""Turns request lines into replies: parse, check authority, run the op, record refusals.

Every request that is refused — malformed, oversized, empty, unknown, from the
wrong peer, denied by policy, or failing inside the daemon — is itself
recorded as a `reject` PER before the error reply goes out, so the ledger holds
100 % of what was asked. What cannot be recorded one by one is counted: a local
user who keeps being refused runs out of refusal budget (ratelimit.py) and is
answered `rate-limited`; while the disk is full, answers are `disk-full` and
kept (root's and the SlurmUser's individually, a user's as a count) to be
recorded once space is back. Reads (`status`, `ingest`) are answered and
counted, not recorded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from spark_slurm.daemon.contracts import ReceiptLike
from spark_slurm.daemon.diskspace import Backlog, DiskWatch, Unanswered, is_disk_full
from spark_slurm.daemon.peers import Authority, Peer, user_name
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.ratelimit import RefusalLimiter
from spark_slurm.daemon.requests import Request, parse_request
from spark_slurm.daemon.tally import Count, Tally
from spark_slurm.errors import BadRequest, DiskFull, GpuError

log = logging.getLogger("sparkd.service")

Observer = Callable[[str, float], None]
_ACTING_OPS = ("prolog", "cap", "intent", "rotate-key")  # refused first when the disk is full
IntentHandler = Callable[[Request, Peer, Origin], dict[str, Any]]


class Service:
    """The daemon's request handler (the socket server's LineHandler)."""

    def __init__(self, pipeline: Pipeline, *, status: Callable[[], dict[str, Any]],
                 ingest: Callable[[], dict[str, Any]] | None = None,
                 observe: Observer | None = None,
                 limiter: RefusalLimiter | None = None,
                 rotate_key: Callable[[], dict[str, Any]] | None = None,
                 disk: DiskWatch | None = None,
                 tallies: tuple[Tally, ...] = (),
                 hook_failed: Callable[[int], None] | None = None,

                 intent: IntentHandler | None = None) -> None:
        self.pipeline = pipeline
        self.intent = intent
        self.status = status
        self.ingest = ingest
        self.rotate_key = rotate_key
        self.observe = observe
        self.limiter = limiter
        self.disk = disk
        self.unrecorded = Tally("ops")  # users' answers that the full disk kept off the ledger
        self.backlog = Backlog()  # the scheduler's, one by one
        self.kept_total = 0
        self.reads: dict[str, int] = {}  # status/ingest answered: counted, not recorded
        self.tallies = (*tallies, self.unrecorded)
        self.hook_failed = hook_failed

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

    # -- what was counted, not recorded one by one -----------------------------------
    def flush_refusals(self) -> list[ReceiptLike]:
        """Record what was counted: one `reject` PER per uid (and code) since last time."""
        receipts = []
        if self.limiter is not None:
            pending = self.limiter.drain()
            for i, s in enumerate(pending):
                try:
                    receipts.append(self._commit_reject(
                        s.uid, "*", "rate-limited",
                        f"{s.count} request(s) from uid {s.uid} answered rate-limited after "
                        "its refusal budget ran out",
                        {"suppressed": {"count": s.count, "first_ns": s.first_ns,
                                        "last_ns": s.last_ns, "ops": s.ops}}))
                except BaseException:
                    self.limiter.restore(pending[i:])
                    raise
        for tally in self.tallies:
            counts = tally.drain()
            for i, c in enumerate(counts):
                try:
                    receipts.append(self._commit_count(tally, c))
                except BaseException:
                    tally.restore(counts[i:])
                    raise
        return receipts

    def _commit_count(self, tally: Tally, c: Count) -> ReceiptLike:
        what = {"busy": "turned away busy (connection limits) without being read",
                "disk-full": "answered disk-full while nothing could be recorded"}
        return self._commit_reject(
            c.uid, "*", c.code,
            f"{c.count} request(s) or connection(s) from uid {c.uid} "
            f"{what.get(c.code, 'answered ' + c.code)}",
            {"suppressed": {"count": c.count, "first_ns": c.first_ns, "last_ns": c.last_ns,
                            tally.detail_key: c.detail}})

    def record_backlog(self, journaled: set[str]) -> list[ReceiptLike]:
        """Once space is back: a `reject` PER for each scheduler request answered
        `disk-full` that the hook did not journal (ids in `journaled` it did)."""
        items = self.backlog.take()
        receipts = []
        for i, item in enumerate(items):
            if item.request_id is not None and str(item.request_id) in journaled:
                continue
            try:
                receipts.append(self.pipeline.writer.commit("reject", {
                    "v": 1, "node": self.pipeline.node, "source": "socket",
                    "op": item.request.get("op", "unknown"), "code": "disk-full",
                    **({"job_id": item.request["job_id"]} if "job_id" in item.request else {}),
                    "reason": "answered disk-full: the ledger's filesystem was full, nothing "
                              "was changed, and the request was not journaled",
                    "answered_ns": item.time_ns, "request": item.request,
                    "requester": {"uid": item.uid, "user": item.user, "role": "scheduler"}}))
            except BaseException:
                self.backlog.put_back(items[i:])
                raise
        return receipts

    def _disk_full(self, request: Request | None, peer: Peer, op: str, exc: BaseException,
                   scheduler: bool) -> dict[str, Any]:
        """The answer when nothing could be recorded for lack of space; kept or counted."""
        if self.disk is not None:
            self.disk.mark_full(str(exc))
        if scheduler and request is not None:
            self.kept_total += 1
            self.backlog.add(Unanswered(time.time_ns(), peer.uid, peer.user, request.id,
                                        request.echo()))
        else:
            self.unrecorded.add(peer.uid, "disk-full", op)
        reply: dict[str, Any] = {"ok": False, "error": {
            "code": "disk-full",
            "message": "the ledger's filesystem is full: nothing was changed and nothing "
                       f"recorded ({exc}); this answer is kept and recorded once space is "
                       "back"}}
        if request is not None and request.id is not None:
            reply["id"] = request.id
        return reply

    # -- requests that never became a checked Request ----------------------------------
    def _commit_reject(self, uid: int, op: str, code: str, reason: str,
                       extra: dict[str, Any]) -> ReceiptLike:
        """A `reject` PER for what never became a checked Request (raw line, or a count)."""
        body = {"v": 1, "node": self.pipeline.node, "source": "socket", "op": op,
                "code": code, "reason": reason.encode("utf-8", "replace").decode("utf-8"),
                "requester": {"uid": uid, "user": user_name(uid), "role": "unknown"}, **extra}
        return self.pipeline.writer.commit("reject", body)

    def _refuse_raw(self, peer: Peer, reason: str, extra: dict[str, Any],
                    code: str = "bad-request") -> dict[str, Any]:
        """Refuse a line that is no request at all: recorded, or counted when out of budget."""
        authority = self.pipeline.authority()
        limiter = self._limiter_for(peer, authority)
        if limiter is not None and (limited := self._limited(limiter, peer, "unknown")):
            return limited
        try:
            receipt = self._commit_reject(peer.uid, "unknown", code, reason, extra)
        except Exception as exc:
            if is_disk_full(exc):
                return self._disk_full(None, peer, "unknown", exc, False)
            raise
        if limiter is not None:
            limiter.refused(peer.uid)
        return {"ok": False, "error": {"code": code, "message": reason},
                "seq": receipt.seq, "hash": receipt.hash}

    def handle_oversized(self, peer: Peer, limit: int) -> dict[str, Any]:
        return self._refuse_raw(peer, f"request exceeds {limit} bytes; connection closed",
                                {"limit_bytes": limit})

    def handle_failure(self, line: bytes, peer: Peer, exc: Exception) -> dict[str, Any]:
        """A request that failed inside the daemon (a bug): still answered and recorded."""
        return self._refuse_raw(peer, f"internal error: {type(exc).__name__}: {exc}",
                                {"raw": _preview(line)}, code="internal")

    def handle_line(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            return self._refuse_raw(peer, exc.message, {"raw": _preview(line)})
        return self.handle(request, peer, Origin())

    # -- checked requests --------------------------------------------------------------
    def handle(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        """Run one checked request from a known peer (socket or journal)."""
        t0 = time.perf_counter()
        # looked up once per request (it reads the passwd entry of slurm_user)
        authority = None if request.op == "status" else self.pipeline.authority()
        limiter = None if authority is None else self._limiter_for(peer, authority)
        if limiter is not None and (
                limited := self._limited(limiter, peer, request.op, request.id)):
            return limited
        scheduler = authority is not None and authority.is_scheduler(peer)
        try:
            if self.disk is not None and request.op in _ACTING_OPS and self.disk.full:
                raise DiskFull("the disk is full (a write failed) and has not yet "
                               "recovered; refusing before any GPU is touched")
            reply = self._dispatch(request, peer, origin, authority)
        except Refusal as refusal:
            reply = self._refuse(request, peer, origin, refusal, limiter=limiter,
                                 scheduler=scheduler)
        except GpuError as exc:
            log.error("%s job=%s: GPU failure: %s", request.op, request.job_id, exc)
            reply = self._refuse(request, peer, origin, Refusal("gpu-error", str(exc)),
                                 limiter=limiter, scheduler=scheduler)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            if origin.source != "socket":
                raise  # ingest stops here; its cursor stays before this line
            reply = self._disk_full(request, peer, request.op, exc, scheduler)
        if request.op in ("status", "ingest") and reply.get("ok"):
            self.reads[request.op] = self.reads.get(request.op, 0) + 1
        if self.observe is not None and request.op != "status":
            self.observe(request.op, time.perf_counter() - t0)
        if scheduler and origin.source == "socket" and request.op in ("prolog", "epilog") \
                and not reply.get("ok") and self.hook_failed is not None \
                and (reply.get("error") or {}).get("code") != "already-restored":
            self.hook_failed(time.time_ns())  # the hook exits non-zero: Slurm drains
        return reply

    def _refuse(self, request: Request, peer: Peer, origin: Origin, refusal: Refusal, *,
                limiter: RefusalLimiter | None, scheduler: bool) -> dict[str, Any]:
        role = refusal.role or ("scheduler" if request.op in ("prolog", "epilog")
                                else "unknown")
        try:
            _, receipt = self.pipeline.reject(request, peer, refusal, role, origin)
        except Exception as exc:
            if not is_disk_full(exc) or origin.source != "socket":
                raise
            return self._disk_full(request, peer, request.op, exc, scheduler)
        if limiter is not None:
            limiter.refused(peer.uid)
        reply = {"ok": False, "id": request.id, "seq": receipt.seq, "hash": receipt.hash,
                 "error": {"code": refusal.code, "message": refusal.reason}}
        if refusal.decision is not None:
            reply["decision"] = refusal.decision
        return reply

    def _dispatch(self, request: Request, peer: Peer, origin: Origin,
                  authority: Authority | None) -> dict[str, Any]:
        op = request.op
        if authority is None:  # status: read-only, open to anyone, their own jobs
            return {"ok": True, "id": request.id, **self._status_for(peer)}
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

    def _status_for(self, peer: Peer) -> dict[str, Any]:
        """`status` as `peer` may see it: root, the SlurmUser and the admin group see
        every job; anyone else only their own (other jobs' GPUs show as held)."""
        out = self.status()
        if peer.uid == 0:
            return out
        authority = self.pipeline.authority()
        if authority.is_scheduler(peer) or authority.is_admin(peer):
            return out
        return visible_to(out, peer.uid)


def visible_to(status: dict[str, Any], uid: int) -> dict[str, Any]:
    """A copy of a `status` reply with other users' jobs taken out."""
    mine = [j for j in status.get("jobs", []) if j.get("uid") == uid]
    own = {str(j["job_id"]) for j in mine}
    gpus = []
    for g in status.get("gpus", []):
        row = dict(g)
        if row.get("job") is not None and str(row["job"]) not in own:
            row["job"] = None
            row["held"] = True
        gpus.append(row)
    out = dict(status, jobs=mine, gpus=gpus)
    startup = status.get("startup")
    if isinstance(startup, dict):
        out["startup"] = {k: [j for j in v if str(j) in own] if isinstance(v, list)
                          and k in ("orphans", "kept") else v for k, v in startup.items()}
    return out


def _preview(line: bytes) -> str:
    return line[:200].decode("utf-8", errors="replace")


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
