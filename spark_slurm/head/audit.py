"""`sparkctl audit JOBID`: one job's whole power story, with proof for every step.

The report gathers the job's records from a node ledger or the merged cluster
ledger (plus the node events that touched the job's GPUs while it ran), puts
them in time order, shows each record's verification (chain link, hash, an
inclusion proof against the latest checkpoint and, given keys, the MAC), resolves each action's five
validation paths, sums the energy the epilog recorded and prices it, and ends
with a verdict. Nothing here trusts a record it has not verified.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from spark_slurm.errors import CheckFailed, UnknownJob
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.node_view import NodeLedgerView
from spark_slurm.head.proofs import Verification, verify_records
from spark_slurm.head.retention import pruned_from_store
from spark_slurm.head.store import ClusterReads, body_of, is_cluster_store, open_store
from spark_slurm.head.tariff import MJ_PER_KWH, Cost, Tariff, price_energy
from spark_slurm.ledger.records import Record

ACTION_KINDS = ("cap", "restore", "throttle", "release", "executor")
GPU_EVENT_KINDS = ("throttle", "release", "drift", "fault", "recovery", "reconcile", "facility",
                   "executor")
PATH_NAMES = ("telemetry", "context", "facility", "policy", "ledger")
JSON_VERSION = 1


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One record in the job's story, as a person and a program both need it."""

    node: str
    seq: int
    time_ns: int
    kind: str
    gpus: tuple[int, ...]
    summary: str
    requester: str | None
    authority: str | None
    verification: Verification
    paths: dict[str, str] | None
    validated: bool | None
    hash: str
    body: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node, "seq": self.seq, "time_ns": self.time_ns, "kind": self.kind,
            "gpus": list(self.gpus), "summary": self.summary, "requester": self.requester,
            "authority": self.authority, "hash": self.hash,
            "verified": self.verification.ok, "chain": self.verification.chain,
            "proof": self.verification.proof, "mac": self.verification.mac,
            "paths": self.paths, "validated": self.validated,
        }


@dataclass(frozen=True, slots=True)
class GpuEnergy:
    """Energy one GPU drew for the job, from the epilog's counter delta."""

    node: str
    gpu: int
    energy_mj: int
    start_ns: int
    end_ns: int
    counter_reset: bool


@dataclass
class AuditReport:
    job_id: str
    source: str
    header: dict[str, Any]
    timeline: list[TimelineEntry]
    energy: list[GpuEnergy]
    cost: Cost | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def energy_mj(self) -> int:
        return sum(e.energy_mj for e in self.energy)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The documented, stable `audit --json` document (docs/head-node.md)."""
        cost = None
        if self.cost is not None:
            cost = {
                "currency": self.cost.currency, "total": _money(self.cost.total),
                "by_period": {k: {"energy_mj": self.cost.by_period_mj[k],
                                  "cost": _money(v)} for k, v in self.cost.by_period_cost.items()},
            }
        return {
            "version": JSON_VERSION, "job_id": self.job_id, "source": self.source,
            "header": self.header,
            "timeline": [e.to_json() for e in self.timeline],
            "energy": {
                "total_mj": self.energy_mj, "total_kwh": kwh_text(self.energy_mj),
                "gpus": [{"node": e.node, "gpu": e.gpu, "energy_mj": e.energy_mj,
                          "kwh": kwh_text(e.energy_mj), "start_ns": e.start_ns, "end_ns": e.end_ns,
                          "counter_reset": e.counter_reset} for e in self.energy],
            },
            "cost": cost,
            "verdict": {"ok": self.ok, "problems": self.problems, "notes": self.notes},
        }


def kwh_text(mj: int) -> str:
    return str((Decimal(mj) / MJ_PER_KWH).quantize(Decimal("0.000001")))


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000001")))


def _obj(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    return value if isinstance(value, dict) else {}


def watts(mw: Any) -> str:
    """Milliwatts as watts for people (integers stay exact)."""
    if not isinstance(mw, int):
        return "?"
    return f"{mw // 1000}" if mw % 1000 == 0 else f"{mw / 1000:.1f}"


def _gpu_list(body: dict[str, Any]) -> tuple[int, ...]:
    if isinstance(body.get("gpu"), int):
        return (body["gpu"],)
    out = []
    for g in body.get("gpus") or []:
        if isinstance(g, dict) and isinstance(g.get("index"), int):
            out.append(g["index"])
        elif isinstance(g, int):
            out.append(g)
    return tuple(out)


def summarize(kind: str, body: dict[str, Any]) -> str:
    """One line saying what a record says happened."""
    dec = _obj(body, "decision")
    if kind == "admission":
        req = body.get("request") or {}
        return (f"admission {body.get('decision')} by rule {body.get('rule')}: "
                f"{req.get('gpus', '?')} GPUs, {req.get('watts', '?')} W/node"
                + (f" ({body['reason']})" if body.get("reason") else ""))
    if kind in ("cap", "restore"):
        parts = []
        for g in body.get("gpus") or []:
            mark = "ok" if g.get("ok", True) else f"MISMATCH {g.get('error', '')}".strip()
            parts.append(f"gpu{g.get('index')} {watts(g.get('previous_mw'))}->"
                         f"{watts(g.get('readback_mw', g.get('intended_mw')))} W {mark}")
        head = "restore" if kind == "restore" else (
            f"cap {dec.get('action', '?')} {watts(dec.get('requested_mw'))}->"
            f"{watts(dec.get('granted_mw'))} W/GPU rule {dec.get('rule', '?')}")
        return head + ("; " + ", ".join(parts) if parts else "")
    if kind == "executor":  # validate-only mode (docs/executors.md)
        who = _obj(body, "executor").get("name") or "no executor"
        moves = ", ".join(
            f"gpu{g.get('index')} {watts(g.get('previous_mw'))}->{watts(g.get('readback_mw'))} W"
            + ("" if g.get("landed") else f" (intended {watts(g.get('intended_mw'))})")
            for g in body.get("gpus") or [] if isinstance(g, dict))
        return f"executor {body.get('verdict')} by {who}: {moves}"
    if kind == "facility":
        ref = body.get("ref") or {}
        head = f"facility {body.get('verdict')} for seq {ref.get('seq')}"
        if not isinstance(body.get("delta_mw"), int):
            return head + (f": {body['reason']}" if body.get("reason") else "")
        return (f"{head}: rack delta {watts(body.get('delta_mw'))} W vs expected "
                f"{watts(body.get('expected_delta_mw'))} W (tolerance "
                f"{watts(body.get('tolerance_mw'))} W)")
    if kind == "reject":
        return f"rejected {body.get('op')}: {body.get('reason')}"
    if kind == "drift":
        return (f"drift gpu{body.get('gpu')}: expected {watts(body.get('expected_mw'))} W, "
                f"observed {watts(body.get('observed_mw'))} W ({body.get('cause')}), "
                f"{body.get('action')}")
    if kind in ("throttle", "release"):
        return (f"{kind} gpu{body.get('gpu')} at {watts(body.get('temp_mc'))} C "
                f"(threshold {watts(body.get('threshold_mc'))} C): "
                f"{watts(body.get('from_mw'))}->{watts(body.get('to_mw'))} W")
    if kind == "fault":
        return f"fault gpu{body.get('gpu')}: {body.get('error')}"
    if kind == "recovery":
        held = "held" if body.get("held") else "NOT held"
        return f"recovery gpu{body.get('gpu')}: ceiling {held} ({watts(body.get('enforced_mw'))} W)"
    if kind == "reconcile":
        return f"reconcile: orphans {body.get('orphans') or []}"
    if kind == "policy":
        return f"policy {str(body.get('sha256', ''))[:12]} from {body.get('path')}"
    return kind


def _requester(body: dict[str, Any]) -> str | None:
    req = body.get("requester")
    if not isinstance(req, dict):
        return None
    return f"{req.get('user', '?')}({req.get('role', '?')})"


def resolve_paths(rec: Record, body: dict[str, Any], followups: list[Record]
                  ) -> tuple[dict[str, str], bool, str | None]:
    """The five paths of an action with the facility outcome filled in from its follow-up."""
    paths = {k: str(v) for k, v in (body.get("paths") or {}).items()}
    facility = [f for f in followups if f.kind == "facility"]
    denied = paths.get("policy") == "deny"
    if facility:
        fbody = body_of(facility[-1])
        paths["facility"] = str(fbody.get("verdict"))
    elif not denied:
        paths["facility"] = "missing"
    problem = None
    # a path the action does not carry (e.g. no job context for a thermal automation)
    # does not apply to it; every path it carries must hold
    bad = [k for k in ("telemetry", "context") if k in paths and paths[k] != "ok"]
    if paths.get("policy") not in ("allow", "clamp", "deny"):
        bad.append("policy")
    if paths.get("ledger") != "committed":
        bad.append("ledger")
    if not denied and paths.get("facility") not in ("correlated", "unavailable"):
        bad.append("facility")
    if any(g.get("ok") is False for g in body.get("gpus") or [] if isinstance(g, dict)):
        bad.append("readback")
    if rec.kind == "executor" and body.get("verdict") != "validated":
        bad.append("verdict")  # denied-but-applied, applied-without-intent, intent-expired
    for name in PATH_NAMES:
        paths.setdefault(name, "n/a")
    if bad:
        problem = (f"{rec.node} seq {rec.seq} ({rec.kind}) not validated: "
                   + ", ".join(f"{b}={paths.get(b, body.get(b, 'mismatch'))}" for b in bad))
    return paths, not bad, problem


def _header(job_id: str, bodies: list[tuple[Record, dict[str, Any]]]) -> dict[str, Any]:
    head: dict[str, Any] = {"job_id": job_id, "user": None, "account": None, "partition": None,
                            "qos": None, "workload_class": None, "nodes": [], "gpus": {}}
    gpus: dict[str, set[int]] = defaultdict(set)
    for rec, body in bodies:
        ctx = dict(_obj(body, "context"))
        if "class" in ctx:
            ctx.setdefault("workload_class", ctx["class"])
        for key in ("user", "account", "partition", "qos", "workload_class"):
            if head[key] is None and ctx.get(key) is not None:
                head[key] = ctx[key]
        if head["user"] is None and _obj(body, "requester").get("role") == "scheduler":
            head["user"] = _obj(body, "requester").get("user")
        if rec.kind in ("cap", "restore"):
            gpus[rec.node].update(_gpu_list(body))
        elif rec.job_id is not None:
            gpus.setdefault(rec.node, set())
    head["nodes"] = sorted(gpus)
    head["gpus"] = {n: sorted(g) for n, g in sorted(gpus.items())}
    return head


def build_report(src: ClusterReads, job_id: str, tariff: Tariff | None = None,
                 source: str = "merged", keys: KeyRing | None = None) -> AuditReport:
    """Assemble, verify and judge everything the ledger holds about one job (with
    `keys`, each record's MAC too, for nodes whose HMAC key the ring holds)."""
    own = src.job_records(job_id)
    if not own:
        raise UnknownJob(f"job {job_id}: no records in {src.name}")
    records: dict[tuple[str, int], Record] = {(r.node, r.seq): r for r in own}
    bodies = [(r, body_of(r)) for r in own]
    header = _header(job_id, bodies)
    job_gpus = {n: set(g) for n, g in header["gpus"].items()}
    # node events that touched the job's GPUs while it held them (up to its last restore)
    for node, seqs in _seq_ranges(own).items():
        for rec in src.node_records(node, seqs[0], seqs[1], GPU_EVENT_KINDS):
            if (rec.node, rec.seq) in records:
                continue
            b = body_of(rec)
            touched = set(_gpu_list(b)) & job_gpus.get(node, set())
            ref_seq = _obj(b, "ref").get("seq")
            if touched or (isinstance(ref_seq, int) and (node, ref_seq) in records):
                records[(rec.node, rec.seq)] = rec
    followups: dict[tuple[str, int], list[Record]] = defaultdict(list)
    for rec in list(records.values()):
        if rec.kind in ACTION_KINDS:
            for f in src.followups(rec.node, rec.seq):
                followups[(rec.node, rec.seq)].append(f)
                records.setdefault((f.node, f.seq), f)
    ordered = sorted(records.values(), key=lambda r: (r.time_ns, r.node, r.seq))
    prover = src.prover() if isinstance(src, NodeLedgerView) else None
    verifications = verify_records(src, ordered, keys, prover)
    report = AuditReport(job_id=job_id, source=source, header=header, timeline=[],
                         energy=[], cost=None)
    cap_time: dict[str, int] = {}
    for rec in ordered:
        body = body_of(rec)
        ver = verifications[(rec.node, rec.seq)]
        paths = validated = None
        if rec.kind in ACTION_KINDS and "paths" in body:
            paths, validated, problem = resolve_paths(rec, body, followups[(rec.node, rec.seq)])
            if problem:
                report.problems.append(problem)
        if not ver.ok:
            report.problems.append(f"{rec.node} seq {rec.seq} ({rec.kind}) fails verification: "
                                   f"chain {ver.chain}, proof {ver.proof}, mac {ver.mac}")
        elif ver.proof == "uncovered":
            report.notes.append(f"{rec.node} seq {rec.seq} is newer than the latest checkpoint "
                                "(chain-verified, no inclusion proof yet)")
        report.timeline.append(TimelineEntry(
            node=rec.node, seq=rec.seq, time_ns=rec.time_ns, kind=rec.kind,
            gpus=_gpu_list(body), summary=summarize(rec.kind, body), requester=_requester(body),
            authority=body.get("authority"), verification=ver, paths=paths,
            validated=validated, hash=rec.hash, body=body))
        if rec.kind == "cap" and rec.job_id == job_id:
            cap_time.setdefault(rec.node, rec.time_ns)
        if rec.kind == "restore" and rec.job_id == job_id:
            start = cap_time.get(rec.node, rec.time_ns)
            for g in body.get("gpus") or []:
                if isinstance(g, dict) and isinstance(g.get("energy_mj"), int):
                    report.energy.append(GpuEnergy(rec.node, int(g["index"]), g["energy_mj"],
                                                   start, rec.time_ns,
                                                   bool(g.get("energy_reset", False))))
    for node in header["nodes"]:
        # what merge found wrong on a node may mean part of this job's story is missing
        for finding in src.findings(node):
            report.problems.append(f"merge finding on {node}: {finding.code} seq "
                                   f"{finding.seq}: {finding.detail}")
    nodes_restored = {e.node for e in report.energy}
    for node in header["nodes"]:
        if node not in nodes_restored:
            report.notes.append(f"{node}: no restore record with energy yet (job running, or "
                                "epilog not recorded)")
    if tariff is not None and report.energy:
        report.cost = _price_all(tariff, report.energy)
    return report


def _seq_ranges(recs: list[Record]) -> dict[str, tuple[int, int]]:
    """Per node: the job's first record to its last restore (or last record if none)."""
    out: dict[str, tuple[int, int]] = {}
    restored: dict[str, int] = {}
    for r in recs:
        lo, hi = out.get(r.node, (r.seq, r.seq))
        out[r.node] = (min(lo, r.seq), max(hi, r.seq))
        if r.kind == "restore":
            restored[r.node] = max(restored.get(r.node, r.seq), r.seq)
    return {n: (lo, restored.get(n, hi)) for n, (lo, hi) in out.items()}


def _price_all(tariff: Tariff, energy: list[GpuEnergy]) -> Cost:
    total = Decimal(0)
    by_mj: dict[str, int] = defaultdict(int)
    by_cost: dict[str, Decimal] = defaultdict(Decimal)
    for e in energy:
        c = price_energy(tariff, e.energy_mj, e.start_ns, e.end_ns)
        total += c.total
        for k, v in c.by_period_mj.items():
            by_mj[k] += v
            by_cost[k] += c.by_period_cost[k]
    return Cost(currency=tariff.currency, total=total, by_period_mj=dict(by_mj),
                by_period_cost=dict(by_cost))


def audit_job(db: str | Path, job_id: str, tariff: Tariff | None = None,
              plot: Path | None = None, keys_dir: Path | None = None) -> AuditReport:
    """The library entry point behind `sparkctl audit`: report (and optional plot).

    `db` is a cluster store (`--db` URL or path) or a node ledger, read through its
    indexes either way. `keys_dir` is a merge trust store (`<node>.pub`,
    `<node>.hmac`): a node ledger's genesis and checkpoints are then checked against
    it as merge would, and every record's MAC is re-checked, so an auditor need not
    take the head node's earlier merge on trust."""
    keys = KeyRing.load(keys_dir) if keys_dir is not None else None
    with open_reads(db, keys) as (src, source):
        if isinstance(src, NodeLedgerView):
            problem = src.identity_problem()
            if problem is not None:  # nothing can be trusted: say why, not "no records"
                raise CheckFailed(f"{db}: job {job_id} cannot be audited: {problem.code} "
                                  f"seq {problem.seq}: {problem.detail}")
        try:
            report = build_report(src, job_id, tariff, source, keys)
        except UnknownJob as exc:
            if isinstance(src, NodeLedgerView) and src.cut is not None:
                raise UnknownJob(f"{exc.message} (records before seq {src.cut.seq} were pruned"
                                 f" into {src.cut.archive_list}: audit the head node's "
                                 "store, or merge the archive into one)") from None
            notes = src.prunes()
            if notes:
                raise UnknownJob(f"{exc.message} ({pruned_from_store(notes)})") from None
            raise
    if plot is not None:
        from spark_slurm.head.plot import plot_job  # noqa: PLC0415 (matplotlib is lazy)

        plot_job(report, plot)
    return report


@contextmanager
def open_reads(db: str | Path, keys: KeyRing | None = None
               ) -> Iterator[tuple[ClusterReads, str]]:
    """What audit, replay and evidence read: a cluster store ("merged") or a node
    ledger ("node"), and which one it is."""
    if is_cluster_store(db):
        with closing(open_store(db)) as store:
            yield store, "merged"
        return
    with NodeLedgerView(Path(db), keys) as view:
        yield view, "node"
