"""Evaluation: the documented order, tightest bound, rule ids, and who may change a cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spark_slurm.canonical import canonical_bytes
from spark_slurm.policy import Policy, PowerRequest

EXAMPLE = Path(__file__).resolve().parents[3] / "etc" / "policy.yaml"


@pytest.fixture(scope="module")
def pol() -> Policy:
    return Policy.load(EXAMPLE)


def req(gpus: int = 2, watts: int | None = None, **kw: Any) -> PowerRequest:
    kw.setdefault("op", "admission")
    return PowerRequest(gpus=gpus, requested_mw_per_gpu=None if watts is None else watts * 1000,
                        **kw)


def test_within_limits_is_allowed_naming_the_tightest_rule(pol: Policy) -> None:
    d = pol.evaluate(req(watts=400, account="physics"))
    assert (d.action, d.granted_mw, d.rule) == ("allow", 400_000, "tenant:physics")
    assert d.policy_sha256 == pol.sha256


def test_no_request_gets_the_most_specific_default(pol: Policy) -> None:
    d = pol.evaluate(req())
    assert (d.action, d.granted_mw, d.rule, d.injected) == ("allow", 500_000, "gpu-limits", True)
    d = pol.evaluate(req(workload_class="training"))
    assert (d.granted_mw, d.rule) == (650_000, "class:training")
    d = pol.evaluate(req(account="students", workload_class="inference"))
    assert (d.granted_mw, d.rule) == (300_000, "class:inference")  # class before tenant


def test_a_default_above_a_tighter_max_is_clamped_not_denied(pol: Policy) -> None:
    d = pol.evaluate(req(account="physics", workload_class="training"))
    assert (d.action, d.requested_mw, d.granted_mw, d.rule) == (
        "clamp", 650_000, 600_000, "tenant:physics")


def test_above_max_clamps_or_denies_per_on_exceed(pol: Policy) -> None:
    d = pol.evaluate(req(watts=650, account="physics"))
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 600_000, "tenant:physics")
    d = pol.evaluate(req(watts=400, account="students"))
    assert (d.action, d.granted_mw, d.rule) == ("deny", None, "tenant:students")
    assert d.reason == "400 W/GPU is above the maximum 350 W/GPU (rule tenant:students)"


def test_any_exceeded_deny_limit_denies_even_if_a_clamp_limit_is_tighter(pol: Policy) -> None:
    # physics clamps at 600, the site denies above 700: an absurd request is refused.
    d = pol.evaluate(req(gpus=1, watts=99_999, account="physics"))
    assert (d.action, d.rule) == ("deny", "gpu-limits")


def test_below_min_is_raised(pol: Policy) -> None:
    d = pol.evaluate(req(watts=50))
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 200_000, "gpu-limits")


def test_node_max_watts_bounds_each_gpu_share(pol: Policy) -> None:
    # 5600 W per node over 9 GPUs is 622.222 W each; a 700 W/GPU request is clamped there.
    d = pol.evaluate(req(gpus=9, watts=650))
    assert d.action == "deny"  # the site's on_exceed is deny
    relaxed = Policy.from_text(EXAMPLE.read_text().replace(
        "  on_exceed: deny           #", "  on_exceed: clamp          #"))
    d = relaxed.evaluate(req(gpus=9, watts=650))
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 622_222, "gpu-limits")


def test_first_matching_deny_rule_decides(pol: Policy) -> None:
    d = pol.evaluate(req(watts=300, partition="debug,login"))
    assert (d.action, d.rule) == ("deny", "no-gpus-on-login")
    assert d.reason == "the login partition has no GPUs (rule no-gpus-on-login)"
    d = pol.evaluate(req(account="students", workload_class="training"))
    assert (d.action, d.rule) == ("deny", "students-no-training")


def test_limit_rules_combine_with_sections(pol: Policy) -> None:
    d = pol.evaluate(req(watts=500, qos="night"))
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 450_000, "night-shift-cap")
    d = pol.evaluate(req(watts=500, qos="low"))
    assert (d.granted_mw, d.rule) == (400_000, "qos:low")


def test_gpu_count_limits_deny(pol: Policy) -> None:
    d = pol.evaluate(req(gpus=2, partition="debug"))
    assert (d.action, d.rule) == ("deny", "partition:debug")
    assert d.reason == "2 GPUs per node is above the limit of 1 (rule partition:debug)"


def test_owner_may_lower_only(pol: Policy) -> None:
    lower = req(op="cap", watts=300, role="owner", current_mw=400_000)
    assert pol.evaluate(lower).action == "allow"
    d = pol.evaluate(req(op="cap", watts=450, role="owner", current_mw=400_000))
    assert (d.action, d.rule) == ("deny", "owner-lower-only")
    assert d.reason == "owners may only lower their cap: asked 450 W/GPU, current 400 W/GPU"
    d = pol.evaluate(req(op="cap", watts=300, role="owner"))
    assert (d.action, d.rule) == ("deny", "owner-lower-only")
    # lowering below the policy minimum is raised to it
    d = pol.evaluate(req(op="cap", watts=100, role="owner", current_mw=400_000))
    assert (d.action, d.granted_mw) == ("clamp", 200_000)


@pytest.mark.parametrize(("owner_may", "watts", "action", "rule"), [
    ("none", 300, "deny", "owner-may-not-change"),
    ("any", 650, "allow", "gpu-limits"),
    ("any", 800, "deny", "gpu-limits"),
])
def test_owner_permission_settings(owner_may: str, watts: int, action: str, rule: str) -> None:
    pol = Policy.from_text(EXAMPLE.read_text().replace("owner_may: lower",
                                                       f"owner_may: {owner_may}"))
    d = pol.evaluate(req(op="cap", watts=watts, role="owner", current_mw=400_000))
    assert (d.action, d.rule) == (action, rule)


def test_admins_and_automation_act_within_hardware_limits_only(pol: Policy) -> None:
    d = pol.evaluate(req(op="cap", watts=900, role="admin", hw_min_mw=150_000,
                         hw_max_mw=1_000_000, account="students"))
    assert (d.action, d.granted_mw, d.rule) == ("allow", 900_000, "admin-hw-limits")
    d = pol.evaluate(req(op="cap", watts=1200, role="admin", hw_max_mw=1_000_000))
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 1_000_000, "hw-limits")
    d = pol.evaluate(req(op="cap", watts=120, role="automation", hw_min_mw=150_000))
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 150_000, "hw-limits")


def test_policy_grant_is_clamped_into_hardware_constraints(pol: Policy) -> None:
    d = pol.evaluate(req(op="prolog", watts=600, hw_max_mw=450_000))
    assert (d.action, d.requested_mw, d.granted_mw, d.rule) == (
        "clamp", 600_000, 450_000, "hw-limits")


@pytest.mark.parametrize("bad", [
    req(gpus=0, watts=100), req(watts=0), req(watts=-5), req(op="launch"),
    req(role="root"), req(op="cap", role="owner", current_mw=1)])
def test_malformed_requests_are_denied_not_raised(pol: Policy, bad: PowerRequest) -> None:
    d = pol.evaluate(bad)
    assert (d.action, d.rule) == ("deny", "request-invalid")


def test_decision_body_is_canonical_per_schema(pol: Policy) -> None:
    body = pol.evaluate(req(watts=650, account="physics")).to_body()
    assert body == {"action": "clamp", "rule": "tenant:physics",
                    "reason": "650 W/GPU is above the maximum 600 W/GPU; clamped",
                    "requested_mw": 650_000, "granted_mw": 600_000, "policy_sha256": pol.sha256}
    canonical_bytes({"decision": body})
    deny = pol.evaluate(req(watts=400, account="students")).to_body()
    assert deny["granted_mw"] is None
    canonical_bytes({"decision": deny})


def test_a_recorded_decision_replays_from_the_snapshot(pol: Policy) -> None:
    request = req(watts=650, account="physics", qos="night")
    first = pol.evaluate(request)
    replayed = Policy.from_text(pol.snapshot_body()["text"]).evaluate(request)
    assert replayed == first


def _mw(pol: Policy, mw: int, **kw: Any) -> tuple[str, int | None, str]:
    kw.setdefault("op", "admission")
    d = pol.evaluate(PowerRequest(gpus=kw.pop("gpus", 2), requested_mw_per_gpu=mw, **kw))
    return d.action, d.granted_mw, d.rule


@pytest.mark.parametrize(("mw", "kw", "expected"), [
    (700_000, {}, ("allow", 700_000, "gpu-limits")),  # the site maximum itself
    (700_001, {}, ("deny", None, "gpu-limits")),  # 1 mW over a deny maximum
    (600_000, {"account": "physics"}, ("allow", 600_000, "tenant:physics")),
    (600_001, {"account": "physics"}, ("clamp", 600_000, "tenant:physics")),
    (350_000, {"account": "students"}, ("allow", 350_000, "tenant:students")),
    (350_001, {"account": "students"}, ("deny", None, "tenant:students")),
    (200_000, {}, ("allow", 200_000, "gpu-limits")),  # the minimum itself
    (199_999, {}, ("clamp", 200_000, "gpu-limits")),
])
def test_each_bound_admits_its_own_value_and_nothing_past_it(
        pol: Policy, mw: int, kw: dict[str, Any], expected: tuple[str, int | None, str]) -> None:
    assert _mw(pol, mw, **kw) == expected


@pytest.mark.parametrize(("mw", "expected"), [
    (1_000_000, ("allow", 1_000_000, "admin-hw-limits")),
    (1_000_001, ("clamp", 1_000_000, "hw-limits")),
    (150_000, ("allow", 150_000, "admin-hw-limits")),
    (149_999, ("clamp", 150_000, "hw-limits")),
])
def test_hardware_bounds_are_inclusive(pol: Policy, mw: int,
                                       expected: tuple[str, int | None, str]) -> None:
    assert _mw(pol, mw, op="cap", role="admin", hw_min_mw=150_000,
               hw_max_mw=1_000_000) == expected


@pytest.mark.parametrize(("asked", "action"), [
    (400_000, "allow"),  # keeping the current cap is not a raise
    (400_001, "deny"),  # one milliwatt more is
    (401_000, "deny"),  # and so is one watt
])
def test_an_owner_may_not_raise_a_cap_by_even_one_watt(pol: Policy, asked: int,
                                                       action: str) -> None:
    d = pol.evaluate(PowerRequest(op="cap", gpus=2, requested_mw_per_gpu=asked, role="owner",
                                  current_mw=400_000))
    assert d.action == action
    if action == "deny":
        assert d.rule == "owner-lower-only"
