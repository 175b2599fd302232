"""The validation pipeline: one power action, every path recorded in one PER.

prolog/cap: authority → context (path 2) → telemetry before (path 1) → policy
(path 4) → restore intent → apply → read-back (path 1) → durable commit (path 5)
→ facility follow-up scheduled (path 3). epilog restores each GPU to the limit
captured before the job and records its energy. GPU changes and the enqueue of
their PER happen under one lock, so ledger order is actuation order; the wait for
the fsync happens outside it, which is what lets coinciding requests batch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spark_slurm.daemon.actuation import Actuator, energy_between, error_text
from spark_slurm.daemon.context import JobFacts, gather
from spark_slurm.daemon.contracts import JobContextSource, PolicyLike, ReceiptLike
from spark_slurm.daemon.peers import Authority, Peer
from spark_slurm.daemon.requests import Request
from spark_slurm.daemon.state import IntentStore, JobState, NodeState
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import GpuError
from spark_slurm.policy.model import Decision, PowerRequest

if TYPE_CHECKING:
    from spark_slurm.daemon.executors import ExecutorGate

log = logging.getLogger("sparkd.pipeline")

FollowUp = Callable[[str, ReceiptLike, list[int], int, str | None], None]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request came from: the socket (default) or the hook's journal."""

    source: str = "socket"
    extra: dict[str, Any] = field(default_factory=dict)


class Refusal(Exception):
    """A request refused before any GPU was touched; becomes a `reject` PER."""

    def __init__(self, code: str, reason: str, decision: dict[str, Any] | None = None,
                 context: dict[str, Any] | None = None, role: str | None = None) -> None:
        super().__init__(reason)
        self.role = role
        self.code = code
        self.reason = reason
        self.decision = decision
        self.context = context


def _decision_body(decision: Decision) -> dict[str, Any]:
    """The PER's `decision`; `injected` only when the policy filled in its default."""
    body = decision.to_body()
    if decision.injected:
        body["injected"] = True
    return body


def _paths(telemetry: str, context: str, policy: str) -> dict[str, str]:
    return {"telemetry": telemetry, "context": context, "facility": "pending",
            "policy": policy, "ledger": "committed"}


def _telemetry_status(entries: list[dict[str, Any]]) -> str:
    good = sum(1 for e in entries if e.get("before")
               and ("readback_mw" in e or "enforced_mw" in e))
    if good == len(entries):
        return "ok"
    return "partial" if good else "failed"


def _reply_entry(e: dict[str, Any]) -> dict[str, Any]:
    if "intended_mw" not in e and "error" not in e:  # left to an external executor
        return {k: e[k] for k in ("index", "expected_mw", "governed_mw", "enforced_mw",
                                  "executor", "intent") if k in e}
    return {"index": e["index"], "intended_mw": e.get("intended_mw"),
            "readback_mw": e.get("readback_mw"), "ok": bool(e.get("ok")),
            **({"error": e["error"]} if "error" in e else {})}


class Pipeline:
    """Handles prolog, epilog and cap; owns the node's governed state."""

    def __init__(self, *, node: str, actuator: Actuator, writer: LedgerWriter,
                 policy: Callable[[], PolicyLike], state: NodeState, intents: IntentStore,
                 authority: Callable[[], Authority], context_source: JobContextSource | None,
                 follow_up: FollowUp | None = None,
                 last_action: Callable[[str], Any] | None = None) -> None:
        self.node = node
        self.actuator = actuator
        self.writer = writer
        self.policy = policy
        self.state = state
        self.intents = intents
        self.authority = authority
        self.context_source = context_source
        self.follow_up = follow_up
        self.last_action = last_action  # the job's newest cap/restore PER (ledger lookup)
        self.lock = threading.RLock()
        # validate-only mode: set by sparkd when executors.validate_only names GPUs
        self.executors: ExecutorGate | None = None

    def external(self, gpu: int) -> bool:
        """Whether an external executor, not sparkd, sets this GPU's limit."""
        return self.executors is not None and self.executors.validate_only(gpu)

    def _expected(self, gpu: int, mw: int, enforced: int | None) -> dict[str, Any]:
        """A per-GPU entry for a limit sparkd leaves to the executor (nothing is set)."""
        entry: dict[str, Any] = {"index": gpu, "uuid": self.actuator.devices[gpu].uuid,
                                 "expected_mw": mw}
        if enforced is not None:
            entry["enforced_mw"] = enforced
        return entry

    def _expect(self, source: str, job_id: str, entries: list[dict[str, Any]],
                body: dict[str, Any], decision: dict[str, Any] | None
                ) -> Callable[[Future[ReceiptLike]], None] | None:
        """Hand the entries left to the executor to the gate (under the lock); what to call
        with the PER's future, so the expectation can name the PER it follows up."""
        if self.executors is None or not any("expected_mw" in e for e in entries):
            return None
        return self.executors.expect_entries(source, job_id, entries, body, decision)

    # -- helpers ---------------------------------------------------------------
    def base(self, request: Request, peer: Peer, role: str, authority: str | None,
             origin: Origin) -> dict[str, Any]:
        body: dict[str, Any] = {"v": 1, "node": self.node, "source": origin.source,
                                "requester": {"uid": peer.uid, "user": peer.user, "role": role},
                                "request": request.echo()}
        if authority is not None:
            body["authority"] = "journal" if origin.source == "journal" else authority
        if request.job_id is not None:
            body["job_id"] = request.job_id
        if origin.extra:
            body[origin.source] = origin.extra
        return body

    def reject(self, request: Request, peer: Peer, refusal: Refusal, role: str,
               origin: Origin) -> tuple[dict[str, Any], ReceiptLike]:
        body = self.base(request, peer, role, None, origin)
        body.update({"op": request.op, "code": refusal.code, "reason": refusal.reason})
        if refusal.decision is not None:
            body["decision"] = refusal.decision
        if refusal.context is not None:
            body["context"] = refusal.context
        receipt = self.writer.commit("reject", body)
        log.info("reject %s job=%s uid=%s: %s", request.op, request.job_id, peer.uid,
                 refusal.reason)
        return body, receipt

    def _check_gpus(self, facts: JobFacts) -> list[int]:
        if not facts.gpus:
            raise Refusal("bad-request", f"job {facts.job_id}: no GPUs named by the request "
                          "or the job context", context=facts.body())
        unknown = [g for g in facts.gpus if not self.actuator.known(g)]
        if unknown:
            raise Refusal("bad-request", f"job {facts.job_id}: GPU index {unknown[0]} does not "
                          f"exist on node {self.node}", context=facts.body())
        targets, why = self.actuator.mig_targets(list(facts.gpus))
        if why is not None:
            raise Refusal("denied", why, context=facts.body())
        for g in targets:
            owner = self.state.owner_of(g)
            if owner is not None and owner != facts.job_id:
                raise Refusal("denied", f"GPU {g} is already governed for job {owner}",
                              context=facts.body())
        return targets

    def decide(self, op: str, facts: JobFacts, gpus: list[int], per_gpu: int | None, *,
                role: str, current: int | None) -> dict[str, Any]:
        policy = self.policy()
        hw_min, hw_max = self.actuator.hw_range(gpus)
        return _decision_body(policy.evaluate(PowerRequest(
            op=op, gpus=len(gpus), requested_mw_per_gpu=per_gpu, account=facts.account,
            partition=facts.partition, qos=facts.qos, workload_class=facts.workload_class,
            role=role, current_mw=current, hw_min_mw=hw_min or None, hw_max_mw=hw_max or None)))

    def _commit_action(self, kind: str, body: dict[str, Any], gpus: list[int],
                       submitted: Callable[[Future[ReceiptLike]], None] | None = None
                       ) -> ReceiptLike:
        """Enqueue under the lock (caller holds it), returning the future's receipt later."""
        future = self.writer.submit(kind, body)
        if submitted is not None:
            submitted(future)
        self.lock.release()
        try:
            receipt = future.result(timeout=60)
        finally:
            self.lock.acquire()
        if self.follow_up is not None:  # every cap and restore names its job and time
            self.follow_up(kind, receipt, gpus, body["changed_ns"], body["job_id"])
        return receipt

    def _mismatch_faults(self, entries: list[dict[str, Any]], job_id: str) -> None:
        for e in entries:
            if e.get("readback") == "lower-limiter":  # recorded in the entry: not drift
                self.state.reported[e["index"]] = e["readback_mw"]
            if "error" not in e and not e.get("ok", True):
                self.state.reported[e["index"]] = e["readback_mw"]
                self.writer.submit("fault", {
                    "v": 1, "node": self.node, "job_id": job_id, "gpu": e["index"],
                    "error": f"read-back mismatch: intended {e['intended_mw']} mW, enforced "
                             f"{e['readback_mw']} mW", "expected_mw": e["intended_mw"],
                    "enforced_mw": e["readback_mw"], "source": "automation"})

    def _undo(self, entries: list[dict[str, Any]], governed: dict[int, int | None],
              jobs: dict[str, JobState]) -> None:
        """Put GPUs and jobs back as they were when a change's PER could not be
        committed (a full disk): an action without its PER would be unprovable. A GPU
        not governed yet (start-up could not read it) goes back to the limit it had."""
        for e in entries:
            g = e["index"]
            if self.external(g):  # an executor's GPU: sparkd set nothing
                continue
            was = governed.get(g)
            mw = was if was is not None else e["before"].get("enforced_mw")
            if mw is not None:
                entry = self.actuator.apply(g, self.state.target(g, mw))
                if "error" in entry:
                    log.error("GPU %s: could not roll back to %s mW: %s", g, mw, entry["error"])
            if was is None:
                self.state.governed.pop(g, None)
            else:
                self.state.governed[g] = was
        self.state.jobs = jobs
        log.warning("GPUs put back to %s: the change could not be recorded", governed)

    def _already_restored(self, job_id: str) -> None:
        """Refuse an epilog for a job whose end is recorded: one restore PER per job end."""
        if job_id in self.state.ending:
            raise Refusal("already-restored", f"job {job_id}: an earlier epilog is recording "
                          "its restore; nothing changed")
        last = None if self.last_action is None else self.last_action(job_id)
        if last is not None and last.kind == "restore":
            raise Refusal("already-restored", f"job {job_id}: its restore is already recorded "
                          f"(PER seq {last.seq}); nothing changed")

    def _admission_seen(self, facts: JobFacts, origin: Origin) -> None:
        """The admission job_submit.lua made, as its token in admin_comment shows."""
        token = facts.token or {}
        body: dict[str, Any] = {
            "v": 1, "node": self.node, "job_id": facts.job_id, "source": origin.source,
            "decision": "inject" if token.get("injected") == 1 else "allow",
            "rule": str(token.get("rule", "")), "reason": "admission token seen at prolog",
            "policy_sha16": str(token.get("policy", "")),
            "request": {"gpus": token.get("gpus"), "watts": token.get("watts"), "raw": token},
            "context": facts.body()}
        self.writer.submit("admission", body)

    # -- operations ------------------------------------------------------------
    def prolog(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        facts = gather(request, self.context_source, self.node)
        gpus = self._check_gpus(facts)
        per_gpu = None if facts.node_mw is None else facts.node_mw // len(facts.gpus)
        decision = self.decide("prolog", facts, gpus, per_gpu, role="scheduler", current=None)
        if decision["action"] == "deny":
            raise Refusal("denied", f"policy rule {decision['rule']}: {decision['reason']}",
                          decision, facts.body())
        granted = int(decision["granted_mw"])
        with self.lock:
            for g in gpus:  # re-checked under the lock: two prologs may race for a GPU
                owner = self.state.owner_of(g)
                if owner is not None and owner != facts.job_id:
                    raise Refusal("denied", f"GPU {g} is already governed for job {owner}",
                                  context=facts.body())
            if request.job_id in self.state.jobs:
                job = self.state.jobs[request.job_id]
                previous = dict(job.previous_mw)
            else:
                previous = {}
                if facts.token is not None:
                    self._admission_seen(facts, origin)
            befores = dict(zip(gpus, self.actuator.each(gpus, self.actuator.before),
                               strict=True))
            for g, (_, enforced, _) in befores.items():
                throttle = self.state.throttled.get(g)  # restore the cap, not the throttle
                idle = throttle.base_mw if throttle else self.state.governed.get(g)
                previous.setdefault(g, idle if idle is not None else enforced or 0)
            job = JobState(
                job_id=facts.job_id, uid=facts.uid, user=facts.user, gpus=gpus,
                previous_mw=previous,
                start_energy_mj={g: b[0].get("energy_mj", 0) for g, b in befores.items()},
                start_energy_epoch={g: b[0].get("energy_epoch", 0) for g, b in befores.items()},
                granted_mw=granted, account=facts.account, partition=facts.partition,
                qos=facts.qos, workload_class=facts.workload_class)
            self.intents.begin(job)  # the restore intent is durable before any limit moves
            jobs_before = self.state.jobs
            governed_before = {g: self.state.governed.get(g) for g in gpus}
            jobs = dict(self.state.jobs)
            jobs[job.job_id] = job
            self.state.jobs = jobs
            entries = []
            changed_ns = time.time_ns()
            targets = {g: self.state.target(g, granted) for g in gpus}
            executed = [g for g in gpus if not self.external(g)]
            applied = dict(zip(executed, self.actuator.each(
                executed, lambda g: self.actuator.apply(g, targets[g])), strict=True))
            for g in gpus:
                before, enforced, err = befores[g]
                entry = applied[g] if g in applied else self._expected(g, targets[g], enforced)
                entry["before"] = before
                entry["previous_mw"] = previous[g]
                if err is not None:
                    entry["before_error"] = err
                entries.append(entry)
                if "error" not in entry and "intended_mw" in entry:
                    self.state.governed[g] = entry["intended_mw"]
            self._mismatch_faults(entries, facts.job_id)
            body = self.base(request, peer, "scheduler", "slurm-prolog", origin)
            body.update({"op": "prolog", "context": facts.body(), "decision": decision,
                         "gpus": entries, "changed_ns": changed_ns,
                         "paths": _paths(_telemetry_status(entries), facts.status,
                                         decision["action"])})
            attach = self._expect("prolog", facts.job_id, entries, body, decision)
            try:
                receipt = self._commit_action("cap", body, gpus, attach)
            except Exception:
                self._undo(entries, governed_before, jobs_before)
                if job.job_id not in jobs_before:
                    with contextlib.suppress(OSError):
                        self.intents.end(job.job_id)
                raise
        return self.reply(request, receipt, decision, entries)

    def epilog(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        assert request.job_id is not None
        # The job-context source may be slow (scontrol): ask it before taking the lock.
        early = None
        if request.job_id not in self.state.jobs:
            self._already_restored(request.job_id)
            early = gather(request, self.context_source, self.node)
        with self.lock:
            job = self.state.jobs.get(request.job_id)
            if job is None or request.job_id in self.state.ending:
                self._already_restored(request.job_id)  # again, now under the lock
            self.state.ending.add(request.job_id)  # a concurrent repeat is refused
            try:
                return self._restore(request, peer, origin, job, early)
            finally:
                self.state.ending.discard(request.job_id)

    def _restore(self, request: Request, peer: Peer, origin: Origin, job: JobState | None,
                 early: JobFacts | None) -> dict[str, Any]:
        """The epilog's work, under the lock, for a job marked as ending."""
        assert request.job_id is not None
        notes: list[str] = []
        if job is None:
            facts = early or gather(request, self.context_source, self.node)
            gpus = [g for g in facts.gpus if self.actuator.known(g)
                    and self.state.owner_of(g) is None]
            targets = {g: self.state.governed.get(g) for g in gpus}
            notes.append("no cap recorded for this job on this node; limits checked "
                         "against the governed idle value")
            context = facts.body()
        else:
            targets = {g: job.previous_mw.get(g) for g in job.gpus}
            context = {"job_id": job.job_id, "user": job.user, "uid": job.uid,
                       "gpus": job.gpus, "status": "ok"}
        total = 0
        changed_ns = time.time_ns()

        def restore_one(g: int) -> dict[str, Any]:
            before, enforced, err = self.actuator.before(g)
            mw = targets[g] if targets[g] is not None else enforced
            if mw is None:  # not governed, and no limit read: `before` failed
                return {"index": g, "error": err}
            if self.external(g):  # the executor restores it; sparkd expects and checks
                entry = self._expected(g, mw, enforced)
                if job is None:
                    entry["governed_mw"] = entry.pop("expected_mw")
            else:
                entry = self.actuator.apply(g, self.state.target(g, mw))
            entry["before"] = before
            entry["previous_mw"] = mw
            if job is not None and job.start_energy_mj.get(g) is not None:
                try:
                    energy = energy_between(job.start_energy_mj[g],
                                            job.start_energy_epoch.get(g, 0),
                                            self.actuator.sample(g))
                    entry["energy_mj"] = energy.energy_mj
                    entry["energy_reset"] = energy.reset
                except GpuError as exc:
                    entry["energy_error"] = error_text(exc)
            return entry

        entries = self.actuator.each(list(targets), restore_one)
        for entry in entries:
            total += int(entry.get("energy_mj", 0))
            if "error" not in entry and "intended_mw" in entry:
                self.state.governed[entry["index"]] = entry["intended_mw"]
        body = self.base(request, peer, "scheduler", "slurm-epilog", origin)
        body.update({"op": "epilog", "context": context, "gpus": entries,
                     "energy_mj": total, "energy_known": job is not None,
                     "changed_ns": changed_ns,
                     "paths": _paths(_telemetry_status(entries),  # no GPUs: "ok"
                                     "ok" if job is not None else "partial", "allow")})
        if notes:
            body["notes"] = notes
        self._mismatch_faults(entries, request.job_id)
        attach = self._expect("epilog", request.job_id, entries, body, None)
        receipt = self._commit_action("restore", body, list(targets), attach)
        if job is not None:
            jobs = dict(self.state.jobs)
            del jobs[request.job_id]  # still there: `ending` keeps other epilogs away
            self.state.jobs = jobs
            try:
                self.intents.end(request.job_id)  # only once the restore is durable
            except OSError as exc:  # start-up sees the restore PER and drops the intent
                log.warning("job %s: restore recorded, intent not closed: %s", job.job_id, exc)
        return self.reply(request, receipt, None, entries)

    def cap(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        assert request.job_id is not None
        job = self.state.jobs.get(request.job_id)
        if job is None:
            raise Refusal("not-found", f"job {request.job_id} holds no cap on node {self.node}")
        external = [g for g in job.gpus if self.external(g)]
        if external:
            raise Refusal("denied", f"GPU(s) {external} of job {job.job_id} are validate-only "
                          f"on node {self.node}: an external executor sets their limits "
                          "(it announces each change with `sparkctl intent`)")
        auth = self.authority()
        if peer.uid == 0:
            role, authority = "admin", "root"
        elif auth.is_admin(peer):
            role, authority = "admin", "admin-group"
        elif job.uid is not None and peer.uid == job.uid:
            role, authority = "owner", "job-owner"
        else:
            raise Refusal("forbidden", f"uid {peer.uid} is neither the owner of job "
                          f"{job.job_id} nor in the admin group")
        per_gpu = request.per_gpu_mw
        if per_gpu is None and request.node_mw is not None:
            per_gpu = request.node_mw // len(job.gpus)
        facts = JobFacts(job_id=job.job_id, user=job.user, uid=job.uid, account=job.account,
                         partition=job.partition, qos=job.qos,
                         workload_class=job.workload_class, gpus=tuple(job.gpus))
        decision = self.decide("cap", facts, job.gpus, per_gpu, role=role,
                                current=job.granted_mw)
        if decision["action"] == "deny":
            raise Refusal("denied", f"policy rule {decision['rule']}: {decision['reason']}",
                          decision, facts.body(), role=role)
        granted = int(decision["granted_mw"])
        with self.lock:
            changed_ns = time.time_ns()
            targets = {g: self.state.target(g, granted) for g in job.gpus}
            governed_before = {g: self.state.governed.get(g) for g in job.gpus}
            granted_before = job.granted_mw

            def change_one(g: int) -> dict[str, Any]:
                before, enforced, _ = self.actuator.before(g)
                entry = self.actuator.apply(g, targets[g])
                entry["before"] = before
                entry["previous_mw"] = enforced if enforced is not None else job.granted_mw
                return entry

            entries = self.actuator.each(job.gpus, change_one)
            for entry in entries:
                if "error" not in entry:
                    self.state.governed[entry["index"]] = entry["intended_mw"]
            job.granted_mw = granted  # restore targets are unchanged: no intent to write
            self._mismatch_faults(entries, job.job_id)
            body = self.base(request, peer, role, authority, origin)
            body.update({"op": "cap", "context": facts.body(), "decision": decision,
                         "gpus": entries, "reason": request.reason or "",
                         "changed_ns": changed_ns,
                         "paths": _paths(_telemetry_status(entries), "ok",
                                         decision["action"])})
            try:
                receipt = self._commit_action("cap", body, job.gpus)
            except Exception:
                job.granted_mw = granted_before
                self._undo(entries, governed_before, self.state.jobs)
                raise
        return self.reply(request, receipt, decision, entries)

    def reply(self, request: Request, receipt: ReceiptLike, decision: dict[str, Any] | None,
              entries: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": True, "id": request.id, "seq": receipt.seq, "hash": receipt.hash,
            "gpus": [_reply_entry(e) for e in entries]}
        if decision is not None:
            out["decision"] = decision
        return out
