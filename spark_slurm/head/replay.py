"""`sparkctl replay`: GPU power state at any instant, and decisions re-evaluated,
from the ledger alone.

State is a fold over the records that move a limit (cap, restore, throttle,
release, drift, reconcile) up to the instant asked for; each GPU's limit comes
with the job holding it and the record behind it. `--recheck` takes every
recorded policy decision, finds the policy snapshot PER in force on that node
(matched by hash), rebuilds the request from what the record holds and asks
the policy again: a decision that does not reproduce is reported.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.errors import ConfigError, InputError
from spark_slurm.head.audit import open_reads
from spark_slurm.head.node_view import NodeLedgerView
from spark_slurm.head.store import ClusterReads, body_of
from spark_slurm.ledger.records import Record

STATE_KINDS = ("cap", "restore", "throttle", "release", "drift", "reconcile", "executor")
DECISION_KINDS = ("cap", "reject", "admission", "policy")


@dataclass
class GpuState:
    """One GPU's governed limit at the instant, and why."""

    node: str
    gpu: int
    limit_mw: int | None
    job_id: str | None
    seq: int
    kind: str
    hash: str
    time_ns: int

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "gpu": self.gpu, "limit_mw": self.limit_mw,
                "job_id": self.job_id,
                "per": {"seq": self.seq, "kind": self.kind, "hash": self.hash,
                        "time_ns": self.time_ns}}


@dataclass
class Recheck:
    """One recorded decision and whether the recorded policy still gives it."""

    node: str
    seq: int
    kind: str
    recorded: dict[str, Any]
    replayed: dict[str, Any] | None
    ok: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "seq": self.seq, "kind": self.kind, "ok": self.ok,
                "recorded": self.recorded, "replayed": self.replayed, "reason": self.reason}


@dataclass
class ReplayReport:
    at_ns: int
    gpus: list[GpuState]
    rechecks: list[Recheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rechecks)

    def to_json(self) -> dict[str, Any]:
        return {"at_ns": self.at_ns, "gpus": [g.to_json() for g in self.gpus],
                "recheck": None if not self.rechecks else {
                    "checked": len(self.rechecks),
                    "mismatches": [r.to_json() for r in self.rechecks if not r.ok]},
                "ok": self.ok}


def parse_time(text: str, option: str = "--at") -> int:
    """ISO-8601 (naive means UTC), Unix seconds (may be fractional) or Unix ns; a
    malformed one is an InputError naming `option`."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        return number if number > 10**14 else number * 1_000_000_000
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return int(seconds * 1_000_000_000)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{option} {text!r}: not ISO-8601, Unix seconds or Unix ns") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _set(states: dict[tuple[str, int], GpuState], rec: Record, gpu: Any,
         limit: Any, job: str | None) -> None:
    if not isinstance(gpu, int):
        return
    states[(rec.node, gpu)] = GpuState(rec.node, gpu, limit if isinstance(limit, int) else None,
                                       job, rec.seq, rec.kind, rec.hash, rec.time_ns)


def fold(records: Iterator[Record]) -> list[GpuState]:
    """Apply limit-moving records in chain order; returns each GPU's last state."""
    states: dict[tuple[str, int], GpuState] = {}
    for rec in records:
        body = body_of(rec)
        if rec.kind in ("cap", "restore", "reconcile"):
            for g in body.get("gpus") or []:
                if not isinstance(g, dict) or "error" in g:
                    continue
                if "expected_mw" in g and "intended_mw" not in g:
                    continue  # validate-only: left to an executor, whose `executor` PER sets it
                limit = g.get("readback_mw", g.get("intended_mw"))
                job = rec.job_id if rec.kind == "cap" else None
                if rec.kind == "reconcile":
                    held = states.get((rec.node, g.get("index", -1)))
                    job = g.get("job_id") or (held.job_id if held else None)
                _set(states, rec, g.get("index"), limit, job)
        elif rec.kind in ("throttle", "release", "drift"):
            gpu = body.get("gpu")
            held = states.get((rec.node, gpu)) if isinstance(gpu, int) else None
            if rec.kind == "drift":
                limit = body.get("readback_mw", body.get("expected_mw")) \
                    if body.get("action") == "reconcile" else body.get("observed_mw")
            else:
                limit = body.get("to_mw")
            _set(states, rec, gpu, limit, held.job_id if held else None)
        elif rec.kind == "executor":  # validate-only: what an external executor was seen to set
            for g in body.get("gpus") or []:
                if isinstance(g, dict) and g.get("landed"):
                    _set(states, rec, g.get("index"), g.get("readback_mw"), rec.job_id)
    return sorted(states.values(), key=lambda s: (s.node, s.gpu))


def _request_from(rec: Record, body: dict[str, Any], current: int | None) -> Any:
    from spark_slurm.policy import PowerRequest  # noqa: PLC0415 (only --recheck needs it)

    ctx = body.get("context") if isinstance(body.get("context"), dict) else {}
    assert isinstance(ctx, dict)
    dec = body.get("decision") if isinstance(body.get("decision"), dict) else {}
    assert isinstance(dec, dict)
    entries = [g for g in body.get("gpus") or [] if isinstance(g, dict)]
    gpus = len(ctx.get("gpus") or []) or len(entries)
    requested = None if dec.get("injected") else dec.get("requested_mw")
    if body.get("op") == "prolog" and isinstance(ctx.get("node_mw"), int) and gpus:
        requested = ctx["node_mw"] // gpus
    mins = [g["before"]["min_mw"] for g in entries
            if isinstance(g.get("before"), dict) and isinstance(g["before"].get("min_mw"), int)]
    maxs = [g["before"]["max_mw"] for g in entries
            if isinstance(g.get("before"), dict) and isinstance(g["before"].get("max_mw"), int)]
    role = (body.get("requester") or {}).get("role", "scheduler")
    return PowerRequest(
        op=str(body.get("op", "prolog")), gpus=gpus, requested_mw_per_gpu=requested,
        account=ctx.get("account"), partition=ctx.get("partition"), qos=ctx.get("qos"),
        workload_class=ctx.get("class", ctx.get("workload_class")), role=str(role),
        current_mw=current if body.get("op") == "cap" else None,
        hw_min_mw=max(mins) if mins else None, hw_max_mw=min(maxs) if maxs else None)


def _admission_request(body: dict[str, Any]) -> Any:
    """The request job_submit.lua decided, from the denial it spooled; None for one it
    refused before asking the policy (its rules are not the policy's), and for the
    admission token a prolog saw (it holds the grant, not what was asked)."""
    from spark_slurm.policy import PowerRequest  # noqa: PLC0415 (only --recheck needs it)
    from spark_slurm.slurm.admin_token import comment_class  # noqa: PLC0415

    req = body.get("request") if isinstance(body.get("request"), dict) else {}
    assert isinstance(req, dict)
    raw = req.get("raw") if isinstance(req.get("raw"), dict) else {}
    ctx = body.get("context") if isinstance(body.get("context"), dict) else {}
    assert isinstance(raw, dict) and isinstance(ctx, dict)
    gpus, watts = req.get("gpus"), req.get("watts")
    if body.get("source") != "spool" or not isinstance(gpus, int) or gpus <= 0 \
            or body.get("rule") in _SHIM_RULES:
        return None
    # what the shim decided on (v1 lines from before it was recorded: the job's fields)
    partition = raw["partitions"] if "partitions" in raw else ctx.get("partition")
    cls = raw["class"] if "class" in raw else comment_class(ctx.get("comment"))
    return PowerRequest(
        op="admission", gpus=gpus,
        requested_mw_per_gpu=watts * 1000 // gpus if isinstance(watts, int) else None,
        account=ctx.get("account"), partition=partition or None,
        qos=raw.get("qos") or None, workload_class=cls or None)


_SHIM_RULES = ("request-invalid", "gpus-per-node-unknown", "power-without-gpus",
               "policy-not-loaded", "internal-error")


def recheck(db: ClusterReads, node: str | None = None) -> list[Recheck]:
    """Re-evaluate every recorded decision against the policy snapshot it names."""
    from spark_slurm.policy import Policy  # noqa: PLC0415 (only --recheck needs it)

    policies: dict[tuple[str, str], Any] = {}
    granted: dict[tuple[str, str], int] = {}
    out: list[Recheck] = []
    for rec in db.records_of_kind(DECISION_KINDS, node):
        body = body_of(rec)
        if rec.kind == "policy":
            try:
                policies[(rec.node, str(body.get("sha256")))] = Policy.from_text(
                    str(body.get("text", "")), f"{rec.node} seq {rec.seq}")
            except ConfigError as exc:
                policies[(rec.node, str(body.get("sha256")))] = exc.message
            continue
        dec: Any
        if rec.kind == "admission":
            request = _admission_request(body)
            if request is None:
                continue  # not a policy decision job_submit.lua recorded with its inputs
            dec = {"action": body.get("decision"), "rule": body.get("rule"),
                   "policy_sha256": body.get("policy_sha256")}
        else:
            request = None
            dec = body.get("decision")
            if not isinstance(dec, dict) or (rec.kind == "reject" and "context" not in body):
                continue
        fields = ("action", "rule") if rec.kind == "admission" else (
            "action", "granted_mw", "rule")
        recorded = {k: dec.get(k) for k in fields}
        policy = policies.get((rec.node, str(dec.get("policy_sha256"))))
        job_key = (rec.node, str(rec.job_id))
        if policy is None:
            out.append(Recheck(rec.node, rec.seq, rec.kind, recorded, None, False,
                               f"no policy snapshot with sha256 {dec.get('policy_sha256')} "
                               "precedes this record"))
            continue
        if isinstance(policy, str):
            out.append(Recheck(rec.node, rec.seq, rec.kind, recorded, None, False,
                               f"recorded policy does not load: {policy}"))
            continue
        if request is None:
            request = _request_from(rec, body, granted.get(job_key))
        got = policy.evaluate(request)
        replayed = {k: getattr(got, k) for k in fields}  # Decision names them alike
        same = replayed == recorded
        out.append(Recheck(rec.node, rec.seq, rec.kind, recorded, replayed, same,
                           "" if same else "decision does not reproduce"))
        if rec.kind == "cap" and isinstance(dec.get("granted_mw"), int):
            granted[job_key] = dec["granted_mw"]
    return out


def replay(db: str | Path, at_ns: int, node: str | None = None,
           with_recheck: bool = False) -> ReplayReport:
    """The library entry point behind `sparkctl replay`. On a node ledger only the
    records before the first one `sparkctl verify` rejects are replayed."""
    with open_reads(db) as (head, _source):
        if isinstance(head, NodeLedgerView):
            from spark_slurm.ledger.verify import verify_ledger  # noqa: PLC0415

            report = verify_ledger(head.path)
            if not report.ok and report.first_bad_seq is not None:
                head.until = report.first_bad_seq
        if node is not None and head.node(node) is None:
            raise InputError(f"node {node!r}: no records in {db}")
        result = ReplayReport(at_ns, fold(head.records_until(node, at_ns, STATE_KINDS)))
        if with_recheck:
            result.rechecks = recheck(head, node)
    return result
