"""Decides one power request against the policy: allow, clamp or deny, naming the rule.

The order is fixed and documented in docs/policy.md: request sanity, requester
authority, ordered deny rules, then every matching limit combined as the tightest
bound. job_submit.lua applies the same order to admission requests (the compiled
table keeps the rules' order), so both sides name the same rule for a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from spark_slurm.policy.model import OPS, ROLES, Decision, Limit, PolicyData, PowerRequest


@dataclass(frozen=True, slots=True)
class Source:
    """A limit that applies to this request and the rule id it is reported under."""

    id: str
    limit: Limit


def watts(mw: int) -> str:
    """Milliwatts as watts for messages (400000 -> '400', 333333 -> '333.333')."""
    whole, rest = divmod(mw, 1000)
    return str(whole) if rest == 0 else f"{whole}.{rest:03d}".rstrip("0")


def applicable(data: PolicyData, req: PowerRequest) -> tuple[Source | None, list[Source]]:
    """The first matching deny rule (if any) and every matching limit, in policy order."""
    partitions = tuple(p for p in (req.partition or "").split(",") if p)
    sources: list[Source] = []
    for rule in data.rules:
        if rule.match.matches(req.account, partitions, req.qos, req.workload_class):
            if rule.action == "deny":
                return Source(rule.id, rule.limit), sources
            sources.append(Source(rule.id, rule.limit))
    if req.workload_class is not None and req.workload_class in data.classes:
        sources.append(Source(f"class:{req.workload_class}", data.classes[req.workload_class]))
    if req.qos is not None and req.qos in data.qos:
        sources.append(Source(f"qos:{req.qos}", data.qos[req.qos]))
    for part in partitions:
        if part in data.partitions:
            sources.append(Source(f"partition:{part}", data.partitions[part]))
    if req.account is not None and req.account in data.tenants:
        sources.append(Source(f"tenant:{req.account}", data.tenants[req.account]))
    g = data.gpu
    sources.append(Source("gpu-limits", Limit(
        min_watts_per_gpu=g.min_watts, max_watts_per_gpu=g.max_watts,
        default_watts_per_gpu=g.default_watts, max_node_watts=g.node_max_watts,
        on_exceed=g.on_exceed)))
    return None, sources


def _max_mw(limit: Limit, gpus: int) -> int | None:
    bounds = []
    if limit.max_watts_per_gpu is not None:
        bounds.append(limit.max_watts_per_gpu * 1000)
    if limit.max_node_watts is not None:
        bounds.append(limit.max_node_watts * 1000 // gpus)
    return min(bounds) if bounds else None


class _Deciding:
    def __init__(self, data: PolicyData, sha256: str, req: PowerRequest) -> None:
        self.data, self.sha256, self.req = data, sha256, req

    def deny(self, rule: str, reason: str, requested: int | None = None) -> Decision:
        asked = self.req.requested_mw_per_gpu if requested is None else requested
        return Decision("deny", asked, None, rule, reason, self.sha256)

    def hardware(self, decision: Decision) -> Decision:
        """Clamp a granted value into the device's own constraints."""
        granted = decision.granted_mw
        if granted is None:
            return decision
        lo, hi = self.req.hw_min_mw, self.req.hw_max_mw
        if hi is not None and granted > hi:
            reason = f"{watts(granted)} W/GPU is above the hardware maximum {watts(hi)} W"
            return Decision("clamp", decision.requested_mw, hi, "hw-limits", reason,
                            self.sha256, decision.injected)
        if lo is not None and granted < lo:
            reason = f"{watts(granted)} W/GPU is below the hardware minimum {watts(lo)} W"
            return Decision("clamp", decision.requested_mw, lo, "hw-limits", reason,
                            self.sha256, decision.injected)
        return decision

    def direct(self, requested: int) -> Decision:
        """Admins and automations act within hardware limits only."""
        rule = f"{self.req.role}-hw-limits"
        reason = f"{self.req.role} request of {watts(requested)} W/GPU within hardware limits"
        return self.hardware(Decision("allow", requested, requested, rule, reason, self.sha256))

    def limits(self, sources: list[Source]) -> Decision:
        req, gpus = self.req, self.req.gpus
        for src in sources:
            if src.limit.max_gpus is not None and gpus > src.limit.max_gpus:
                return self.deny(src.id, f"{gpus} GPUs per node is above the limit of "
                                         f"{src.limit.max_gpus} (rule {src.id})")
        injected = req.requested_mw_per_gpu is None
        if injected:
            origin = next(s for s in sources if s.limit.default_watts_per_gpu is not None)
            assert origin.limit.default_watts_per_gpu is not None
            requested = origin.limit.default_watts_per_gpu * 1000
        else:
            assert req.requested_mw_per_gpu is not None
            requested = req.requested_mw_per_gpu
        maxes = [(m, s) for s in sources if (m := _max_mw(s.limit, gpus)) is not None]
        mins = [(s.limit.min_watts_per_gpu * 1000, s) for s in sources
                if s.limit.min_watts_per_gpu is not None]
        hi, hi_src = min(maxes, key=lambda pair: pair[0])
        lo, lo_src = max(mins, key=lambda pair: pair[0]) if mins else (0, hi_src)
        lo = min(lo, hi)
        asked = f"{watts(requested)} W/GPU" + (" (default)" if injected else "")
        if requested > hi:
            strict = [(m, s) for m, s in maxes if requested > m and s.limit.on_exceed == "deny"]
            if strict and not injected:
                bound, src = strict[0]
                return self.deny(src.id, f"{asked} is above the maximum {watts(bound)} W/GPU "
                                         f"(rule {src.id})", requested)
            reason = f"{asked} is above the maximum {watts(hi)} W/GPU; clamped"
            return Decision("clamp", requested, hi, hi_src.id, reason, self.sha256, injected)
        if requested < lo:
            reason = f"{asked} is below the minimum {watts(lo)} W/GPU; raised"
            return Decision("clamp", requested, lo, lo_src.id, reason, self.sha256, injected)
        rule = origin.id if injected else hi_src.id
        reason = f"{asked} within [{watts(lo)}, {watts(hi)}] W/GPU"
        return Decision("allow", requested, requested, rule, reason, self.sha256, injected)


def evaluate(data: PolicyData, sha256: str, req: PowerRequest) -> Decision:
    """Decide `req`; never raises for any request, a malformed one is denied."""
    d = _Deciding(data, sha256, req)
    asked = req.requested_mw_per_gpu
    if req.op not in OPS:
        return d.deny("request-invalid", f"unknown operation {req.op!r}")
    if req.role not in ROLES:
        return d.deny("request-invalid", f"unknown requester role {req.role!r}")
    if req.gpus < 1:
        return d.deny("request-invalid", f"a power request needs at least one GPU, got {req.gpus}")
    if asked is not None and asked <= 0:
        return d.deny("request-invalid", f"{watts(asked)} W/GPU is not a positive power")
    if req.role in ("admin", "automation"):
        return d.direct(asked if asked is not None else data.gpu.default_watts * 1000)
    if req.role == "owner":
        if data.owner_may == "none":
            return d.deny("owner-may-not-change", "job owners may not change caps under this "
                                                  "policy (permissions.owner_may: none)")
        if asked is None:
            return d.deny("request-invalid", "an owner's cap request must name the watts")
        if data.owner_may == "lower":
            if req.current_mw is None:
                return d.deny("owner-lower-only", "owners may only lower their cap, and the "
                                                  "job's current cap is unknown")
            if asked > req.current_mw:
                return d.deny("owner-lower-only", f"owners may only lower their cap: asked "
                                                  f"{watts(asked)} W/GPU, current "
                                                  f"{watts(req.current_mw)} W/GPU")
    denied, sources = applicable(data, req)
    if denied is not None:
        rule = next(r for r in data.rules if r.id == denied.id)
        return d.deny(rule.id, f"{rule.reason} (rule {rule.id})")
    return d.hardware(d.limits(sources))
