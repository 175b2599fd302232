"""The bodies of `executor` PERs (docs/per-schema.md), from what the gate saw.

Pure functions, so the verdict records can be read (and tested) apart from the
threads and locks that decide when to write them.
"""

from __future__ import annotations

from typing import Any

from spark_slurm.daemon.context import JobFacts
from spark_slurm.daemon.executor_intents import APPLIED_WITHOUT_INTENT, ExecutorIntent
from spark_slurm.daemon.state import JobState
from spark_slurm.gpu.backend import Sample

_AUTOMATION = {"uid": 0, "user": "sparkd", "role": "automation"}


def after(sample: Sample | None) -> dict[str, Any]:
    """Telemetry at the moment a change was seen to land (path 1, after)."""
    if sample is None:
        return {}
    return {"time_ns": sample.time_ns, "power_mw": sample.power_mw,
            "energy_mj": sample.energy_mj, "temp_mc": sample.temp_mc,
            "util_pct": sample.util_pct, "enforced_mw": sample.enforced_mw,
            "reasons": sample.reasons}


def job_facts(job: JobState) -> JobFacts:
    """Path 2 for a job this node governs, as the prolog recorded it."""
    return JobFacts(job_id=job.job_id, user=job.user, uid=job.uid, account=job.account,
                    partition=job.partition, qos=job.qos, workload_class=job.workload_class,
                    gpus=tuple(job.gpus))


def context_body(facts: JobFacts) -> dict[str, Any]:
    body = facts.body()
    if not facts.job_id:
        del body["job_id"]
    return body


def _telemetry(entries: list[dict[str, Any]]) -> str:
    good = sum(1 for e in entries if e.get("before") and e.get("landed"))
    if good == len(entries):
        return "ok"
    return "partial" if good else "failed"


def _policy(decision: dict[str, Any], approved: bool | None = None) -> str:
    allowed = decision.get("action") == "allow" if approved is None else approved
    return "allow" if allowed else "deny"


def outcome_body(intent: ExecutorIntent, entries: list[dict[str, Any]], *, node: str,
                 verdict: str, now: int, ref: dict[str, Any] | None) -> dict[str, Any]:
    """validated / denied-but-applied / intent-expired: one PER for one intent."""
    landed_ns = [e["landed_ns"] for e in entries if e.get("landed")]
    body: dict[str, Any] = {
        "v": 1, "node": node, "source": "socket" if intent.source == "announce" else
        "automation", "authority": intent.authority, "requester": intent.requester,
        "verdict": verdict, "executor": intent.executor,
        "intent": {"id": intent.id, "source": intent.source, "approved": intent.approved,
                   "created_ns": intent.created_ns, "deadline_ns": intent.deadline_ns},
        "decision": intent.decision, "context": intent.context, "gpus": entries,
        "changed_ns": min(landed_ns) if landed_ns else now,
        "paths": {"telemetry": _telemetry(entries),
                  "context": str(intent.context.get("status", "partial")),
                  "facility": "pending", "policy": _policy(intent.decision, intent.approved),
                  "ledger": "committed"}}
    if intent.job_id:
        body["job_id"] = intent.job_id
    if intent.request is not None:
        body["request"] = intent.request
    if ref is not None:
        body["ref"] = ref
    return body


def unannounced_body(*, node: str, gpu: dict[str, Any], cause: tuple[str, bool],
                     facts: JobFacts, decision: dict[str, Any], owner: str | None,
                     others: list[str], now: int) -> dict[str, Any]:
    """applied-without-intent: attributed drift, with the policy's view of the value."""
    body: dict[str, Any] = {
        "v": 1, "node": node, "source": "automation", "authority": "automation:drift",
        "requester": _AUTOMATION, "verdict": APPLIED_WITHOUT_INTENT, "cause": cause[0],
        "energy_reset": cause[1], "decision": decision, "context": context_body(facts),
        "gpus": [gpu], "changed_ns": now,
        "paths": {"telemetry": "ok", "context": facts.status, "facility": "pending",
                  "policy": _policy(decision), "ledger": "committed"}}
    if owner is not None:
        body["job_id"] = owner
    if others:
        body["pending_intents"] = others  # announced for other values: not this one
    return body
