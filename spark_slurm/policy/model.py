"""The site policy as typed records: what the YAML means once it has been checked.

Watts are kept as the admin wrote them (whole watts, per GPU unless the key says
`node`); evaluation converts to milliwatts, the unit every PER stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["allow", "clamp", "deny"]
OnExceed = Literal["clamp", "deny"]

OPS = ("admission", "prolog", "cap")
ROLES = ("scheduler", "owner", "admin", "automation")
DEFAULT_SPOOL = "/var/spool/spark/denials.jsonl"


@dataclass(frozen=True, slots=True)
class Limit:
    """Bounds one rule or section puts on a request; None means no bound from it."""

    min_watts_per_gpu: int | None = None
    max_watts_per_gpu: int | None = None
    default_watts_per_gpu: int | None = None
    max_node_watts: int | None = None
    max_gpus: int | None = None
    on_exceed: OnExceed = "clamp"


@dataclass(frozen=True, slots=True)
class Match:
    """Which jobs a rule applies to: every given field must match (lists mean any of)."""

    account: tuple[str, ...] = ()
    partition: tuple[str, ...] = ()
    qos: tuple[str, ...] = ()
    workload_class: tuple[str, ...] = ()

    def matches(self, account: str | None, partitions: tuple[str, ...], qos: str | None,
                workload_class: str | None) -> bool:
        if self.account and account not in self.account:
            return False
        if self.partition and not set(partitions) & set(self.partition):
            return False
        if self.qos and qos not in self.qos:
            return False
        return not (self.workload_class and workload_class not in self.workload_class)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ordered rule: `deny` ends evaluation, `limit` adds bounds and goes on."""

    id: str
    action: Literal["deny", "limit"]
    match: Match
    limit: Limit
    reason: str = ""


@dataclass(frozen=True, slots=True)
class GpuSettings:
    """Site-wide per-GPU bounds (rule id `gpu-limits`) and the injected default."""

    default_watts: int = 400
    min_watts: int = 100
    max_watts: int = 1000
    node_max_watts: int | None = None
    on_exceed: OnExceed = "clamp"


@dataclass(frozen=True, slots=True)
class ThermalSettings:
    """Thermal guard: throttle at threshold_c, release below release_c (hysteresis)."""

    enabled: bool = True
    threshold_c: int = 87
    release_c: int = 80
    throttle_watts: int | None = None
    throttle_fraction: float | None = 0.7
    interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class FacilitySettings:
    """Facility correlation windows around a change and the tolerance on its Δ."""

    enabled: bool = True
    before_s: float = 10.0
    after_s: float = 10.0
    tolerance_w: int = 500
    tolerance_pct: int = 25


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """What job_submit.lua does when it cannot decide, and where denials go."""

    fail_mode: Literal["closed", "open"] = "closed"
    spool: str = DEFAULT_SPOOL


@dataclass(frozen=True, slots=True)
class PolicyData:
    """Everything a policy file says, checked and with defaults filled in."""

    gpu: GpuSettings = field(default_factory=GpuSettings)
    tenants: dict[str, Limit] = field(default_factory=dict)
    partitions: dict[str, Limit] = field(default_factory=dict)
    qos: dict[str, Limit] = field(default_factory=dict)
    classes: dict[str, Limit] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    owner_may: Literal["lower", "none", "any"] = "lower"
    admin_group: str = "sparkadm"
    thermal: ThermalSettings = field(default_factory=ThermalSettings)
    drift: Literal["reconcile", "record"] = "reconcile"
    on_daemon_down: Literal["fail_open", "fail_closed"] = "fail_closed"
    facility: FacilitySettings = field(default_factory=FacilitySettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)

    @property
    def default_watts_per_gpu(self) -> int:
        return self.gpu.default_watts


@dataclass(frozen=True, slots=True)
class PowerRequest:
    """One request for a per-GPU cap, from whoever asks (scheduler, owner, admin, automation)."""

    op: str
    gpus: int
    requested_mw_per_gpu: int | None
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    workload_class: str | None = None
    role: str = "scheduler"
    current_mw: int | None = None
    hw_min_mw: int | None = None
    hw_max_mw: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome, naming the rule that decided and why, in per-GPU milliwatts."""

    action: Action
    requested_mw: int | None
    granted_mw: int | None
    rule: str
    reason: str
    policy_sha256: str = ""
    injected: bool = False

    def to_body(self) -> dict[str, Any]:
        """The PER `decision` object (docs/per-schema.md); granted_mw is null on deny."""
        return {
            "action": self.action,
            "rule": self.rule,
            "reason": self.reason,
            "requested_mw": self.requested_mw,
            "granted_mw": self.granted_mw,
            "policy_sha256": self.policy_sha256,
        }
