"""What a decision tells the user and the ledger, on every path through evaluate.

The reason is what `sparkctl cap` and the denial spool show, so it names the rule
and the watts; `requested_mw` and `policy_sha256` go into the PER whatever the
outcome; `injected` tells a replay that the job asked for nothing (head/replay.py
then re-evaluates with no request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spark_slurm.policy import Policy, PowerRequest

EXAMPLE = Path(__file__).resolve().parents[3] / "etc" / "policy.yaml"


@pytest.fixture(scope="module")
def pol() -> Policy:
    return Policy.load(EXAMPLE)


def ask(pol: Policy, mw: int | None, gpus: int = 2, **kw: Any) -> Any:
    kw.setdefault("op", "admission")
    return pol.evaluate(PowerRequest(gpus=gpus, requested_mw_per_gpu=mw, **kw))


def test_an_allow_names_the_bounds_it_was_checked_against(pol: Policy) -> None:
    d = ask(pol, 400_000, account="physics")
    assert d.reason == "400 W/GPU within [200, 600] W/GPU"
    assert (d.requested_mw, d.policy_sha256, d.injected) == (400_000, pol.sha256, False)


def test_fractional_watts_read_without_trailing_zeros(pol: Policy) -> None:
    # gpupower:399 on 2 GPUs reaches the prolog as 199.5 W/GPU.
    d = ask(pol, 199_500)
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 200_000, "gpu-limits")
    assert d.reason == "199.5 W/GPU is below the minimum 200 W/GPU; raised"
    assert (d.requested_mw, d.policy_sha256) == (199_500, pol.sha256)
    # 5600 W per node over 9 GPUs: the share has three decimals.
    relaxed = Policy.from_text(EXAMPLE.read_text().replace(
        "  on_exceed: deny           #", "  on_exceed: clamp          #"))
    d = ask(relaxed, 650_000, gpus=9)
    assert d.reason == "650 W/GPU is above the maximum 622.222 W/GPU; clamped"


def test_a_clamped_default_says_it_was_the_default(pol: Policy) -> None:
    d = ask(pol, None, account="physics", workload_class="training")
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 600_000, "tenant:physics")
    assert d.reason == "650 W/GPU (default) is above the maximum 600 W/GPU; clamped"
    assert d.injected is True


def test_a_default_below_the_site_minimum_is_raised_and_still_injected() -> None:
    # A class default is checked against its own bounds only, so it may sit below the site's.
    pol = Policy.from_text("gpu: {min_watts: 200, max_watts: 700, default_watts: 500}\n"
                           "classes:\n  eco: {default_watts_per_gpu: 150}\n")
    d = ask(pol, None, workload_class="eco")
    assert (d.action, d.requested_mw, d.granted_mw, d.rule) == (
        "clamp", 150_000, 200_000, "gpu-limits")
    assert d.reason == "150 W/GPU (default) is below the minimum 200 W/GPU; raised"
    assert (d.injected, d.policy_sha256) == (True, pol.sha256)


def test_an_equal_minimum_is_named_by_the_first_source_in_order() -> None:
    # docs/policy.md: class before the site; a tie names the more specific source.
    pol = Policy.from_text("gpu: {min_watts: 200, max_watts: 700, default_watts: 500}\n"
                           "classes:\n  eco: {min_watts_per_gpu: 200, max_watts_per_gpu: 300}\n")
    d = ask(pol, 150_000, workload_class="eco")
    assert (d.action, d.granted_mw, d.rule) == ("clamp", 200_000, "class:eco")


def test_an_unknown_workload_class_adds_nothing(pol: Policy) -> None:
    # --comment=spark:class=typo is not an error: the other limits still apply.
    d = ask(pol, 650_000, workload_class="no-such-class")
    assert (d.action, d.granted_mw, d.rule) == ("allow", 650_000, "gpu-limits")
    d = ask(pol, None, workload_class="no-such-class")
    assert (d.granted_mw, d.rule, d.injected) == (500_000, "gpu-limits", True)


@pytest.mark.parametrize(("mw", "kw", "rule", "reason"), [
    (300_000, {"partition": "login"}, "no-gpus-on-login",
     "the login partition has no GPUs (rule no-gpus-on-login)"),
    (300_000, {"partition": "debug"}, "partition:debug",
     "2 GPUs per node is above the limit of 1 (rule partition:debug)"),
    (400_000, {"account": "students"}, "tenant:students",
     "400 W/GPU is above the maximum 350 W/GPU (rule tenant:students)"),
    (450_000, {"op": "cap", "role": "owner", "current_mw": 400_000}, "owner-lower-only",
     "owners may only lower their cap: asked 450 W/GPU, current 400 W/GPU"),
])
def test_a_denial_records_what_was_asked_and_under_which_policy(
        pol: Policy, mw: int, kw: dict[str, Any], rule: str, reason: str) -> None:
    d = ask(pol, mw, **kw)
    assert (d.action, d.rule, d.reason) == ("deny", rule, reason)
    assert (d.requested_mw, d.granted_mw, d.policy_sha256) == (mw, None, pol.sha256)


@pytest.mark.parametrize(("mw", "kw", "reason"), [
    (300_000, {"op": "launch"}, "unknown operation 'launch'"),
    (300_000, {"role": "root"}, "unknown requester role 'root'"),
    (300_000, {"gpus": 0}, "a power request needs at least one GPU, got 0"),
    (-5_000, {}, "-5 W/GPU is not a positive power"),
    (0, {}, "0 W/GPU is not a positive power"),
    (None, {"op": "cap", "role": "owner", "current_mw": 400_000},
     "an owner's cap request must name the watts"),
    (300_000, {"op": "cap", "role": "owner"},
     "owners may only lower their cap, and the job's current cap is unknown"),
])
def test_a_malformed_request_is_told_what_is_wrong(pol: Policy, mw: int | None,
                                                   kw: dict[str, Any], reason: str) -> None:
    d = ask(pol, mw, **kw)
    assert (d.action, d.reason, d.requested_mw) == ("deny", reason, mw)
    assert d.rule in ("request-invalid", "owner-lower-only")


def test_an_owner_under_owner_may_none_is_told_which_setting_refuses() -> None:
    pol = Policy.from_text(EXAMPLE.read_text().replace("owner_may: lower", "owner_may: none"))
    d = ask(pol, 300_000, op="cap", role="owner", current_mw=400_000)
    assert (d.rule, d.reason) == ("owner-may-not-change", "job owners may not change caps "
                                  "under this policy (permissions.owner_may: none)")


def test_one_milliwatt_is_a_positive_power_raised_to_the_minimum(pol: Policy) -> None:
    d = ask(pol, 1)
    assert (d.action, d.requested_mw, d.granted_mw, d.rule) == ("clamp", 1, 200_000, "gpu-limits")


@pytest.mark.parametrize("role", ["admin", "automation"])
def test_an_admin_request_records_itself_and_may_omit_the_watts(pol: Policy, role: str) -> None:
    d = ask(pol, 900_000, op="cap", role=role, account="students")
    assert (d.action, d.requested_mw, d.granted_mw, d.rule) == (
        "allow", 900_000, 900_000, f"{role}-hw-limits")
    assert d.reason == f"{role} request of 900 W/GPU within hardware limits"
    assert d.policy_sha256 == pol.sha256
    d = ask(pol, None, op="cap", role=role)  # docs/policy.md: no request means the site default
    assert (d.action, d.requested_mw, d.granted_mw) == ("allow", 500_000, 500_000)


def test_a_hardware_clamp_names_both_values_and_keeps_the_record(pol: Policy) -> None:
    d = ask(pol, 1_200_000, op="cap", role="admin", hw_max_mw=1_000_000)
    assert d.reason == "1200 W/GPU is above the hardware maximum 1000 W"
    assert (d.requested_mw, d.policy_sha256) == (1_200_000, pol.sha256)
    d = ask(pol, 120_000, op="cap", role="automation", hw_min_mw=150_500)
    assert (d.granted_mw, d.rule) == (150_500, "hw-limits")
    assert d.reason == "120 W/GPU is below the hardware minimum 150.5 W"
    assert (d.requested_mw, d.policy_sha256) == (120_000, pol.sha256)


@pytest.mark.parametrize(("hw", "granted"), [
    ({"hw_max_mw": 450_000}, 450_000),  # the 500 W default does not fit this GPU
    ({"hw_min_mw": 600_000}, 600_000),  # nor does it reach this one's floor
])
def test_a_default_clamped_by_the_hardware_is_still_injected(
        pol: Policy, hw: dict[str, int], granted: int) -> None:
    d = ask(pol, None, op="prolog", **hw)
    assert (d.action, d.requested_mw, d.granted_mw, d.rule) == (
        "clamp", 500_000, granted, "hw-limits")
    assert (d.injected, d.policy_sha256) == (True, pol.sha256)
