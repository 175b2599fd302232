"""Validate-only mode: an external executor sets the limits, sparkd validates each one.

On the GPUs `executors.validate_only` names, sparkd never calls set-limit. An
executor announces an intent (`intent` request, `sparkctl intent`); the gate
checks who asks (SO_PEERCRED: root, the policy's admin group, `executors.users`),
the job context (path 2) and the policy (path 4), answers approve or deny, and
watches the GPUs (path 1 read-back, every monitor period). One `executor` PER
records the outcome: `validated` (approved and landed by the deadline),
`denied-but-applied` (a policy violation), `intent-expired` (approved, never
landed), or `applied-without-intent` (a change no pending intent explains,
attributed like drift). A prolog or epilog on such a GPU registers an
expectation instead of setting the limit. docs/executors.md is the user's view.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.daemon.config import ExecutorSettings
from spark_slurm.daemon.context import JobFacts, gather
from spark_slurm.daemon.contracts import LedgerLike, ReceiptLike
from spark_slurm.daemon.executor_intents import (
    DENIED_BUT_APPLIED,
    INTENT_EXPIRED,
    VALIDATED,
    ExecutorIntent,
    PendingIntents,
)
from spark_slurm.daemon.executor_records import (
    after,
    context_body,
    job_facts,
    outcome_body,
    unannounced_body,
)
from spark_slurm.daemon.peers import Peer, uid_of
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.requests import Request
from spark_slurm.errors import GpuError
from spark_slurm.gpu.backend import Sample

log = logging.getLogger("sparkd.executors")
_S = 1_000_000_000
Cause = Callable[[Any, Sample], tuple[str, bool]]  # (limits, sample) -> (cause, energy reset)


class ExecutorGate:
    """Announcements, expectations, landings and verdicts for validate-only GPUs."""

    def __init__(self, pipeline: Pipeline, settings: ExecutorSettings, book: PendingIntents,
                 *, clock: Clock = SYSTEM_CLOCK, count: Callable[[str], None] | None = None,
                 compact_after: int = 1000) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.book = book
        self.clock = clock
        self.count = count or (lambda _verdict: None)
        self.pending: dict[str, ExecutorIntent] = {}
        self.compact_after = compact_after  # pending-file lines before an idle rewrite
        self._writing = 0  # outcome PERs queued, not yet durable (their `done` still due)
        # its own lock: the writer thread's callback must never wait for the pipeline lock
        self._writing_lock = threading.Lock()

    # -- configuration -------------------------------------------------------------
    def validate_only(self, gpu: int) -> bool:
        return self.settings.validate_only(gpu)

    def gpus(self) -> list[int]:
        return [g for g in sorted(self.pipeline.actuator.devices) if self.validate_only(g)]

    def _authority(self, peer: Peer) -> str | None:
        """Why this peer may announce intents (the kernel's word, never the request's)."""
        if peer.uid == 0:
            return "root"
        if self.pipeline.authority().is_admin(peer):
            return "admin-group"
        if peer.uid in {uid_of(u) for u in self.settings.users}:
            return "executor-user"
        return None

    def _new(self, **fields: Any) -> ExecutorIntent:
        now = self.clock.now_ns()
        deadline_s = fields.pop("deadline_s", None) or self.settings.deadline_s
        return ExecutorIntent(id=f"{now:x}-{secrets.token_hex(4)}", created_ns=now,
                              deadline_ns=now + int(deadline_s * _S), **fields)

    # -- the `intent` request ------------------------------------------------------
    def announce(self, request: Request, peer: Peer, origin: Origin) -> dict[str, Any]:
        """Approve or deny one executor's intent; a denial is also a `reject` PER."""
        authority = self._authority(peer)
        if authority is None:
            raise Refusal("forbidden", f"uid {peer.uid} (pid {peer.pid}) may not announce "
                          "executor intents: root, the policy's admin_group and "
                          "executors.users may", role="executor")
        assert request.gpus and request.per_gpu_mw is not None and request.executor
        if request.deadline_s is not None and request.deadline_s > self.settings.max_deadline_s:
            raise Refusal("bad-request", f"deadline_s {request.deadline_s:g} is above "
                          f"executors.max_deadline_s {self.settings.max_deadline_s:g}",
                          role="executor")
        gpus = list(request.gpus)
        facts = self._context(request, gpus)
        decision = self.pipeline.decide("cap", facts, gpus, request.per_gpu_mw,
                                         role="scheduler", current=None)
        approved = decision["action"] == "allow"
        actuator = self.pipeline.actuator
        befores = dict(zip(gpus, actuator.each(gpus, actuator.before), strict=True))
        identity = {"name": request.executor, "uid": peer.uid, "user": peer.user,
                    "pid": peer.pid, "authority": authority}
        requester = {"uid": peer.uid, "user": peer.user, "role": "executor"}
        intent = self._new(
            source="announce", executor=identity, requester=requester, authority=authority,
            job_id=request.job_id, targets={g: request.per_gpu_mw for g in gpus},
            approved=approved, decision=decision, context=context_body(facts),
            before={g: b[0] for g, b in befores.items()},
            previous={g: self.pipeline.state.governed.get(g) for g in gpus},
            request=request.echo(), deadline_s=request.deadline_s)
        shown = {"id": intent.id, "gpus": gpus, "intended_mw": request.per_gpu_mw,
                 "deadline_ns": intent.deadline_ns}
        if approved:
            with self.pipeline.lock:
                joined = self._join_expectation(intent)
                if joined is None:
                    self.book.add(intent)  # durable before the approval is answered
                    self.pending[intent.id] = intent
                else:
                    shown.update(id=joined.id, deadline_ns=joined.deadline_ns,
                                 expected_by=joined.source)
            log.info("intent %s by %s (uid %s) approved: GPUs %s -> %s mW", shown["id"],
                     request.executor, peer.uid, gpus, request.per_gpu_mw)
            return {"ok": True, "id": request.id, "verdict": "approve", "intent": shown,
                    "decision": decision}
        return self._deny(request, peer, origin, intent, decision=decision, shown=shown)

    def _context(self, request: Request, gpus: list[int]) -> JobFacts:
        """Path 2 for an intent: the job (as this node governs it, or the job-context
        source says) and a check that every GPU is validate-only and the job's."""
        actuator, state = self.pipeline.actuator, self.pipeline.state
        for g in gpus:
            if not actuator.known(g):
                raise Refusal("bad-request", f"GPU index {g} does not exist on node "
                              f"{self.pipeline.node}", role="executor")
            if actuator.devices[g].mig_parent is not None:
                raise Refusal("bad-request", f"GPU {g} is a MIG slice; the power limit belongs "
                              "to its parent GPU: name the parent", role="executor")
            if not self.validate_only(g):
                raise Refusal("bad-request", f"GPU {g} is not validate-only on node "
                              f"{self.pipeline.node}: sparkd sets its limit itself (use "
                              "sparkctl cap, or list it in executors.validate_only)",
                              role="executor")
        job_id = request.job_id
        job = state.jobs.get(job_id) if job_id is not None else None
        for g in gpus:
            owner = state.owner_of(g)
            if owner is not None and owner != job_id:
                raise Refusal("denied", f"GPU {g} is held by job {owner}, not "
                              f"{job_id or '(no job named)'}", role="executor")
        if job is not None:
            outside = sorted(set(gpus) - set(job.gpus))
            if outside:
                raise Refusal("denied", f"job {job.job_id} does not hold GPU(s) {outside} on "
                              f"node {self.pipeline.node} (it holds {job.gpus})",
                              role="executor")
            return job_facts(job)
        if job_id is None:
            return JobFacts(job_id="", gpus=tuple(gpus), status="partial",
                            notes=("no job named: site-wide policy limits only",))
        facts = gather(dataclasses.replace(request, gpus=None), self.pipeline.context_source,
                       self.pipeline.node)
        if facts.gpus and not set(gpus) <= set(facts.gpus):
            outside = sorted(set(gpus) - set(facts.gpus))
            raise Refusal("denied", f"job {job_id} is not allocated GPU(s) {outside} on node "
                          f"{self.pipeline.node} (it holds {list(facts.gpus)})",
                          context=facts.body(), role="executor")
        return facts

    def _join_expectation(self, intent: ExecutorIntent) -> ExecutorIntent | None:
        """An announcement of what a prolog/epilog already expects becomes that
        expectation's executor, so the change still gets one PER (caller holds the lock)."""
        for other in self.pending.values():
            if other.source == "announce" or other.job_id != intent.job_id:
                continue
            if all(other.targets.get(g) == mw and g not in other.landed
                   for g, mw in intent.targets.items()):
                other.executor = intent.executor | {"expected_by": other.source}
                self.book.set_executor(other.id, other.executor)
                return other
        return None

    def _deny(self, request: Request, peer: Peer, origin: Origin, intent: ExecutorIntent, *,
              decision: dict[str, Any], shown: dict[str, Any]) -> dict[str, Any]:
        if decision["action"] == "clamp":
            reason = (f"policy rule {decision['rule']} does not allow "
                      f"{int(request.per_gpu_mw or 0) / 1000:g} W/GPU ({decision['reason']}); the "
                      f"nearest it allows is {int(decision['granted_mw']) / 1000:g} W/GPU")
        else:
            reason = f"policy rule {decision['rule']}: {decision['reason']}"
        body = self.pipeline.base(request, peer, "executor", None, origin)
        body.update({"op": "intent", "code": "denied", "reason": reason, "decision": decision,
                     "context": intent.context, "executor": intent.executor,
                     "intent": {"id": intent.id, "deadline_ns": intent.deadline_ns}})
        with self.pipeline.lock:  # watched from now on: applying it anyway is a violation
            future = self.pipeline.writer.submit("reject", body)
            intent.ref_future = future
            self.book.add(intent)
            self.pending[intent.id] = intent
        receipt = future.result(timeout=60)
        intent.ref = {"seq": receipt.seq, "hash": receipt.hash}
        self.book.set_ref(intent.id, intent.ref)
        log.info("intent %s by %s (uid %s) denied: %s", intent.id, request.executor, peer.uid,
                 reason)
        return {"ok": False, "id": request.id, "seq": receipt.seq, "hash": receipt.hash,
                "verdict": "deny", "intent": shown, "decision": decision,
                "error": {"code": "denied", "message": reason}}

    # -- prolog / epilog -----------------------------------------------------------
    def expect(self, *, source: str, job_id: str, targets: dict[int, int],
               decision: dict[str, Any] | None, context: dict[str, Any],
               before: dict[int, dict[str, Any]], previous: dict[int, int | None],
               requester: dict[str, Any], authority: str) -> ExecutorIntent:
        """Register what the scheduler's hook was granted on validate-only GPUs, for the
        executor to set (the caller holds the lock and attaches the PER's future)."""
        intent = self._new(source=source, executor={"name": self.settings.expect,
                                                    "expected_by": source},
                           requester=requester, authority=authority, job_id=job_id,
                           targets=targets, approved=True, decision=decision or {},
                           context=context, before=before, previous=previous)
        self.book.add(intent)
        self.pending[intent.id] = intent
        return intent

    def expect_entries(self, source: str, job_id: str, entries: list[dict[str, Any]],
                       body: dict[str, Any], decision: dict[str, Any] | None
                       ) -> Callable[[Future[ReceiptLike]], None]:
        """`expect` for the entries of a cap/restore PER that carry `expected_mw`: marks
        them and the body with the intent, returns what attaches the PER's future."""
        waiting = [e for e in entries if "expected_mw" in e]
        intent = self.expect(
            source=source, job_id=job_id,
            targets={e["index"]: e["expected_mw"] for e in waiting}, decision=decision,
            context=body.get("context") or {},
            before={e["index"]: e.get("before") or {} for e in waiting},
            previous={e["index"]: e.get("previous_mw") for e in waiting},
            requester=body["requester"], authority=str(body.get("authority", source)))
        for e in waiting:
            e.update(executor=intent.executor["name"], intent=intent.id)
        body["expectation"] = {"id": intent.id, "executor": intent.executor["name"],
                               "deadline_ns": intent.deadline_ns,
                               "gpus": [e["index"] for e in waiting]}
        return functools.partial(self.attach, intent)

    def attach(self, intent: ExecutorIntent, future: Future[ReceiptLike]) -> None:
        """The expectation follows up this PER (its future, queued under the lock)."""
        intent.ref_future = future

        def durable(f: Future[ReceiptLike]) -> None:
            if f.exception() is None:
                self.book.set_ref(intent.id, {"seq": f.result().seq, "hash": f.result().hash})

        future.add_done_callback(durable)

    # -- watching (the monitor thread) ---------------------------------------------
    def watch(self, minor: int, sample: Sample, cause: Cause) -> None:
        """One look at a validate-only GPU: land matching intents, attribute other changes."""
        pipeline, state = self.pipeline, self.pipeline.state
        actuator = pipeline.actuator
        with pipeline.lock:
            try:
                limits = actuator.gpu.limits(actuator.index(minor))
            except GpuError:
                return
            observed, now = limits.enforced_mw, self.clock.now_ns()
            governed = state.governed.get(minor)
            matched = False
            for intent in self.pending.values():
                target = intent.targets.get(minor)
                if target is None or not actuator.agrees(target, observed) \
                        or minor in intent.landed:
                    continue
                # a denied value counts as applied only once it replaces what was there
                previous = intent.previous.get(minor)
                if intent.approved or previous is None \
                        or not actuator.agrees(previous, observed):
                    intent.landed[minor] = {"readback_mw": observed, "landed_ns": now,
                                            "after": after(sample)}
                    matched = True
            if governed is not None and not actuator.agrees(governed, observed) \
                    and not matched:
                self._unannounced(minor, governed, observed, why=cause(limits, sample),
                                  sample=sample, now=now)
            state.governed[minor] = observed  # sparkd accepts what is enforced, never resets

    def _unannounced(self, minor: int, governed: int, observed: int, *, why: tuple[str, bool],
                     sample: Sample, now: int) -> None:
        """`applied-without-intent`: attributed drift, judged against the policy as if asked."""
        state = self.pipeline.state
        owner = state.owner_of(minor)
        job = state.jobs.get(owner) if owner is not None else None
        facts = job_facts(job) if job is not None else JobFacts(
            job_id="", gpus=(minor,), status="partial",
            notes=("no job holds this GPU: site-wide policy limits only",))
        decision = self.pipeline.decide("cap", facts, list(facts.gpus), observed,
                                        role="scheduler", current=None)
        gpu = {"index": minor, "uuid": self.pipeline.actuator.devices[minor].uuid,
               "previous_mw": governed, "readback_mw": observed, "landed": True,
               "landed_ns": now, "after": after(sample), "ok": True}
        body = unannounced_body(node=self.pipeline.node, gpu=gpu, cause=why, facts=facts,
                                decision=decision, owner=owner, now=now,
                                others=[i.id for i in self.pending.values()
                                        if minor in i.targets])
        self._submit(body, [minor], now, owner)
        log.warning("GPU %s: %s -> %s mW applied without an intent (%s)", minor, governed,
                    observed, why[0])

    def settle(self) -> None:
        """Write the outcome of every intent that has fully landed or passed its deadline."""
        now = self.clock.now_ns()
        with self.pipeline.lock:
            for intent in list(self.pending.values()):
                if not (intent.complete or now >= intent.deadline_ns):
                    continue
                if intent.ref_future is not None and not intent.ref_future.done():
                    continue  # its cap/restore/reject PER is still being committed
                del self.pending[intent.id]
                self._outcome(intent, now)
            with self._writing_lock:
                idle = not self.pending and not self._writing
            if idle and self.book.appended >= self.compact_after:
                self.book.compact({})  # nothing pending: keep the file from growing forever

    def _outcome(self, intent: ExecutorIntent, now: int) -> None:
        if not intent.approved and not intent.landed:
            self.book.done(intent.id)  # denied and not applied: the reject PER says it all
            return
        verdict = (VALIDATED if intent.complete else INTENT_EXPIRED) if intent.approved \
            else DENIED_BUT_APPLIED
        actuator = self.pipeline.actuator
        entries = []
        for g, mw in sorted(intent.targets.items()):
            entry: dict[str, Any] = {"index": g, "uuid": actuator.devices[g].uuid,
                                     "before": intent.before.get(g, {}),
                                     "previous_mw": intent.previous.get(g), "intended_mw": mw}
            landed = intent.landed.get(g)
            if landed is not None:
                entry.update(landed, landed=True, ok=True)
            else:
                try:
                    entry["readback_mw"] = actuator.gpu.limits(actuator.index(g)).enforced_mw
                except GpuError as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                entry.update(landed=False, ok=False)
            entries.append(entry)
        try:
            ref = intent.resolved_ref(timeout_s=0)
        except Exception:  # its PER failed: the outcome is still recorded
            ref = None
        body = outcome_body(intent, entries, node=self.pipeline.node, verdict=verdict, now=now,
                            ref=ref)
        future = self._submit(body, [e["index"] for e in entries if e.get("landed")],
                              body["changed_ns"], intent.job_id)
        with self._writing_lock:
            self._writing += 1

        def durable(f: Future[ReceiptLike]) -> None:
            if f.exception() is None:
                self.book.done(intent.id)
            with self._writing_lock:
                self._writing -= 1

        future.add_done_callback(durable)
        log.info("intent %s: %s", intent.id, verdict)

    def _submit(self, body: dict[str, Any], landed: list[int], changed_ns: int,
                job_id: str | None) -> Future[ReceiptLike]:
        """Queue the `executor` PER (caller holds the lock); the facility follow-up
        (path 3) is scheduled once it is durable, when a limit actually moved."""
        future = self.pipeline.writer.submit("executor", body)
        self.count(str(body["verdict"]))
        follow = self.pipeline.follow_up
        if follow is not None and landed:
            def done(f: Future[ReceiptLike]) -> None:
                if f.exception() is None:
                    follow("executor", f.result(), landed, changed_ns, job_id)

            future.add_done_callback(done)
        return future

    # -- start-up and status -------------------------------------------------------
    def resume(self, ledger: LedgerLike) -> int:
        """Load intents pending at the last stop, minus those whose outcome the ledger
        already holds (a crash between the PER and the `done` line); returns how many."""
        pending = self.book.load()
        if pending:
            oldest = min(i.created_ns for i in pending.values())
            for record in ledger.records_newest_first(kinds=["executor"]):
                if record.time_ns < oldest:
                    break
                intent_id = (record.body.get("intent") or {}).get("id")
                pending.pop(str(intent_id), None)
        self.book.compact(pending)
        self.pending = pending
        return len(pending)

    def status(self) -> dict[str, Any]:
        with self.pipeline.lock:
            pending = [{"id": i.id, "source": i.source, "executor": i.executor.get("name"),
                        "job_id": i.job_id, "approved": i.approved,
                        "targets": {str(g): mw for g, mw in i.targets.items()},
                        "landed": sorted(i.landed), "deadline_ns": i.deadline_ns}
                       for i in self.pending.values()]
        return {"validate_only": self.gpus(), "expect": self.settings.expect,
                "pending": pending}
