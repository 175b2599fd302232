"""What a prolog and a cap record and answer: the PER body in full, the reply, the
state left behind, and what happens when the change cannot be recorded.

The GPUs are test_actuation's in-test fake, so every reading is a known number;
the ledger and its writer are the daemon's own.
"""

from __future__ import annotations

import grp
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from spark_slurm.daemon.actuation import Actuator
from spark_slurm.daemon.contracts import ReceiptLike
from spark_slurm.daemon.peers import Authority, Peer
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.requests import request_from
from spark_slurm.daemon.state import IntentStore, NodeState, Throttle, last_action
from spark_slurm.ledger import Ledger
from spark_slurm.policy import Policy
from tests.unit.daemon.test_actuation import Gpus, whole
from tests.unit.daemon.test_nvml_actuation import Writer

ADMINS = grp.getgrgid(os.getgid()).gr_name
POLICY = f"""\
version: 1
gpu: {{default_watts: 500, min_watts: 200, max_watts: 700}}
permissions: {{owner_may: lower, admin_group: {ADMINS}}}
tenants: {{physics: {{max_watts_per_gpu: 600}}}}
qos: {{low: {{max_watts_per_gpu: 400}}}}
classes: {{inference: {{max_watts_per_gpu: 300}}}}
rules:
  - id: no-login
    match: {{partition: login}}
    action: deny
    reason: the login partition has no GPUs
"""
ROOT = Peer(0, 0, 1)
OWNER = Peer(1000, 1000, 5, frozenset({1000}))
STRANGER = Peer(1001, 1001, 6, frozenset({1001}))
SHA = Policy.from_text(POLICY).sha256
DISK_FULL = OSError(28, "No space left on device")


class Failing(Writer):
    """The daemon's writer, whose commits of the kinds in `refuse` fail (a full disk)."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.refuse: set[str] = set()

    def submit(self, kind: str, body: Mapping[str, Any]) -> Future[ReceiptLike]:
        if kind not in self.refuse:
            return super().submit(kind, body)
        failed: Future[ReceiptLike] = Future()
        failed.set_exception(DISK_FULL)
        return failed


class Node:
    """Four whole GPUs at 700 W under POLICY, a pipeline with every hook recorded."""

    def __init__(self, root: Path, source: Any = None, ledger_lookup: bool = True) -> None:
        self.gpus = Gpus([whole(i) for i in range(4)])
        self.ledger = Ledger.open(root / "l.db", node="n1")
        self.writer = Failing(self.ledger)
        self.writer.start()
        self.policy = Policy.from_text(POLICY)
        self.intents = IntentStore(root)
        self.follow_ups: list[tuple[Any, ...]] = []
        self.pipeline = Pipeline(
            node="n1", actuator=Actuator(self.gpus), writer=self.writer,
            policy=lambda: self.policy, state=NodeState(), intents=self.intents,
            authority=lambda: Authority(admin_group=ADMINS), context_source=source,
            follow_up=lambda *args: self.follow_ups.append(args),
            last_action=(lambda job: last_action(self.ledger, job)) if ledger_lookup else None)

    @property
    def state(self) -> NodeState:
        return self.pipeline.state

    def prolog(self, job: str, gpus: list[int] | None, watts: int | None = None,
               origin: Origin | None = None, **fields: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"op": "prolog", "job_id": job, "uid": 1000, "user": "alice",
                                **fields}
        if gpus is not None:
            data["gpus"] = gpus
        if watts is not None:
            data["watts"] = watts
        return self.pipeline.prolog(request_from(data), ROOT, origin or Origin())

    def cap(self, job: str, peer: Peer = ROOT, **fields: Any) -> dict[str, Any]:
        data = {"op": "cap", "job_id": job, **fields}
        return self.pipeline.cap(request_from(data), peer, Origin())

    def epilog(self, job: str, origin: Origin | None = None, **fields: Any) -> dict[str, Any]:
        data = {"op": "epilog", "job_id": job, **fields}
        return self.pipeline.epilog(request_from(data), ROOT, origin or Origin())

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        self.writer.flush()
        return [r.body for r in self.ledger.records(kinds=[kind])]

    def limits(self) -> list[int]:
        return [c.requested for c in self.gpus.cards]


def reading(energy: int = 9_000, limit: int = 700_000, epoch: int = 2) -> dict[str, Any]:
    """The `before` telemetry test_actuation's fake gives for a GPU."""
    return {"time_ns": 11, "power_mw": 250_000, "energy_mj": energy, "energy_epoch": epoch,
            "temp_mc": 41_000, "util_pct": 77, "limit_mw": limit, "enforced_mw": limit,
            "reasons": 4, "min_mw": 100_000, "max_mw": 700_000, "default_mw": 700_000}


def allow(watts: int, requested: int | None = None) -> dict[str, Any]:
    return {"action": "allow", "rule": "gpu-limits",
            "reason": f"{watts} W/GPU within [200, 700] W/GPU",
            "requested_mw": (requested or watts) * 1000, "granted_mw": watts * 1000,
            "policy_sha256": SHA}


# -- prolog ------------------------------------------------------------------------

def test_a_prolog_records_every_path_and_answers_what_was_set(node: Node) -> None:
    node.gpus.cards[1].energy = 12_000
    started = time.time_ns()
    reply = node.pipeline.prolog(request_from({
        "op": "prolog", "id": 17, "job_id": "7", "uid": 1000, "user": "alice",
        "gpus": [0, 1], "watts": 800}), ROOT, Origin())
    (cap,) = node.bodies("cap")
    assert started <= cap.pop("changed_ns") <= time.time_ns()
    assert cap == {
        "v": 1, "node": "n1", "source": "socket", "authority": "slurm-prolog", "job_id": "7",
        "requester": {"uid": 0, "user": "root", "role": "scheduler"},
        "request": {"op": "prolog", "job_id": "7", "uid": 1000, "user": "alice",
                    "gpus": [0, 1], "node_mw": 800_000},
        "op": "prolog",
        "context": {"job_id": "7", "gpus": [0, 1], "status": "partial", "user": "alice",
                    "uid": 1000, "node_mw": 800_000,
                    "notes": ["no job context source configured; request fields only"]},
        "decision": allow(400),
        "gpus": [{"index": g, "uuid": f"GPU-{g}", "intended_mw": 400_000,
                  "readback_mw": 400_000, "ok": True, "before": reading(e),
                  "previous_mw": 700_000} for g, e in ((0, 9_000), (1, 12_000))],
        "paths": {"telemetry": "ok", "context": "partial", "facility": "pending",
                  "policy": "allow", "ledger": "committed"}}
    (receipt,) = node.ledger.records(kinds=["cap"])
    assert reply == {"ok": True, "id": 17, "seq": receipt.seq, "hash": receipt.hash,
                     "gpus": [{"index": g, "intended_mw": 400_000, "readback_mw": 400_000,
                               "ok": True} for g in (0, 1)],
                     "decision": allow(400)}
    assert node.limits() == [400_000, 400_000, 700_000, 700_000]
    assert node.state.governed == {0: 400_000, 1: 400_000}
    job = node.state.jobs["7"]
    assert (job.previous_mw, job.start_energy_mj, job.start_energy_epoch, job.granted_mw) == (
        {0: 700_000, 1: 700_000}, {0: 9_000, 1: 12_000}, {0: 2, 1: 2}, 400_000)
    assert IntentStore(node.intents.path.parent).load() == {"7": job}
    ((kind, followed, gpus, changed_ns, job_id),) = node.follow_ups
    assert (kind, followed.seq, gpus, job_id) == ("cap", receipt.seq, [0, 1], "7")
    assert changed_ns == receipt.body["changed_ns"]


def test_a_journal_prolog_is_on_the_journals_authority_and_says_where_it_was(
        node: Node) -> None:
    node.prolog("7", [2], 300, origin=Origin("journal", {"file": "hook.jsonl", "line": 3}))
    (cap,) = node.bodies("cap")
    assert (cap["source"], cap["authority"], cap["journal"]) == (
        "journal", "journal", {"file": "hook.jsonl", "line": 3})
    assert "socket" not in cap


def test_the_restore_target_is_the_cap_under_a_throttle_then_governed_then_enforced(
        node: Node) -> None:
    node.state.governed[0] = 650_000
    node.state.throttled[1] = Throttle(base_mw=600_000, to_mw=300_000, ref=None)
    node.state.governed[1] = 300_000
    node.gpus.cards[2].requested = 550_000
    node.prolog("7", [0, 1, 2], 1200)
    assert node.state.jobs["7"].previous_mw == {0: 650_000, 1: 600_000, 2: 550_000}
    (cap,) = node.bodies("cap")
    assert [e["previous_mw"] for e in cap["gpus"]] == [650_000, 600_000, 550_000]
    assert node.limits()[:3] == [400_000, 300_000, 400_000]  # the throttle still holds GPU 1
    assert node.state.throttled[1].base_mw == 400_000


def test_a_gpu_without_a_before_reading_is_partial_and_restores_to_nothing_known(
        node: Node) -> None:
    node.gpus.cards[1].fail.add("sample")
    node.prolog("7", [0, 1], 800)
    (cap,) = node.bodies("cap")
    second = cap["gpus"][1]
    assert (second["before"], second["before_error"], second["previous_mw"]) == (
        {}, "GpuLost: GPU 1: sample failed", 0)
    assert "before_error" not in cap["gpus"][0]
    assert cap["paths"]["telemetry"] == "partial"
    job = node.state.jobs["7"]
    assert job.start_energy_mj == {0: 9_000, 1: 0} and job.start_energy_epoch == {0: 2, 1: 0}


def test_telemetry_is_failed_when_no_gpu_was_read_before_and_after(node: Node) -> None:
    node.gpus.cards[0].fail.add("sample")  # no before reading
    node.gpus.cards[1].fail.add("limits")  # neither before nor read-back
    reply = node.prolog("7", [0, 1], 800)
    (cap,) = node.bodies("cap")
    assert cap["paths"]["telemetry"] == "failed"
    assert [e["ok"] for e in reply["gpus"]] == [True, False]
    assert reply["gpus"][1] == {"index": 1, "intended_mw": 400_000, "readback_mw": None,
                                "ok": False, "error": "GpuLost: GPU 1: limits failed"}
    assert node.state.governed == {0: 400_000}  # GPU 1's error: not governed


def test_a_read_back_mismatch_is_a_fault_and_a_lower_limiter_only_remembered(
        node: Node) -> None:
    node.gpus.cards[0].enforced = 650_000  # the driver kept another limit
    node.gpus.cards[1].enforced = 300_000  # the BMC holds it lower
    node.prolog("7", [0, 1, 2], 1200)
    (fault,) = node.bodies("fault")
    assert fault == {"v": 1, "node": "n1", "job_id": "7", "gpu": 0,
                     "error": "read-back mismatch: intended 400000 mW, enforced 650000 mW",
                     "expected_mw": 400_000, "enforced_mw": 650_000, "source": "automation"}
    assert node.state.reported == {0: 650_000, 1: 300_000}


def test_an_admission_token_is_recorded_once_at_the_first_prolog(tmp_path: Path) -> None:
    jobs = {"7": SimpleNamespace(admin_comment="spark:v=1,watts=800,gpus=2,wpg=400,"
                                               "rule=r1,policy=abcd,injected=1",
                                 account="physics", node_gpus={"n1": [0, 1], "n2": [3]}),
            "8": SimpleNamespace(admin_comment="spark:v=1,watts=600,gpus=1",
                                 node_gpus={"n1": [2]})}
    node = Node(tmp_path, source=SimpleNamespace(get=jobs.__getitem__))
    try:
        node.prolog("7", None)  # GPUs and watts from the context source's token
        node.prolog("7", None)  # a repeated prolog of a job that holds its cap
        node.prolog("8", None, origin=Origin("journal"))
        first, second = node.bodies("admission")
        context = node.bodies("cap")[0]["context"]
        assert first == {
            "v": 1, "node": "n1", "job_id": "7", "source": "socket", "decision": "inject",
            "rule": "r1", "reason": "admission token seen at prolog", "policy_sha16": "abcd",
            "request": {"gpus": 2, "watts": 800, "raw": {
                "v": 1, "watts": 800, "gpus": 2, "wpg": 400, "rule": "r1", "policy": "abcd",
                "injected": 1}},
            "context": context}
        assert (second["decision"], second["rule"], second["policy_sha16"],
                second["source"], second["request"]["watts"]) == ("allow", "", "", "journal",
                                                                  600)
        assert node.limits() == [400_000, 400_000, 600_000, 700_000]
    finally:
        node.writer.stop()
        node.ledger.close()


def test_a_repeated_prolog_keeps_the_first_restore_targets(node: Node) -> None:
    node.prolog("7", [0], 400)
    node.prolog("7", [0], 300)
    assert node.state.jobs["7"].previous_mw == {0: 700_000}  # not the 400 W the job had
    assert node.limits()[0] == 300_000


@pytest.mark.parametrize(("gpus", "message"), [
    ([], "job 7: no GPUs named by the request or the job context"),
    ([1, 9], "job 7: GPU index 9 does not exist on node n1"),
])
def test_a_prolog_for_gpus_the_node_lacks_is_a_bad_request(
        node: Node, gpus: list[int], message: str) -> None:
    with pytest.raises(Refusal) as err:
        node.prolog("7", gpus, 400)
    assert (err.value.code, err.value.reason) == ("bad-request", message)
    assert err.value.context is not None and err.value.context["job_id"] == "7"
    assert node.limits() == [700_000] * 4


def test_a_gpu_another_job_holds_is_refused_even_when_taken_meanwhile(node: Node) -> None:
    node.prolog("5", [1], 400)
    with pytest.raises(Refusal) as err:
        node.prolog("7", [0, 1], 800)
    assert (err.value.code, err.value.reason) == ("denied",
                                                  "GPU 1 is already governed for job 5")
    # A prolog that checked GPU 3 before another took it is refused under the lock.
    policy = node.policy
    raced: list[str] = []

    def racing() -> Policy:
        if not raced:
            raced.append("6")
            node.prolog("6", [3], 300)
        return policy

    node.pipeline.policy = racing
    with pytest.raises(Refusal) as err:
        node.prolog("7", [3], 400)
    assert (err.value.code, err.value.reason) == ("denied",
                                                  "GPU 3 is already governed for job 6")
    assert err.value.context is not None and err.value.context["job_id"] == "7"
    assert node.limits() == [700_000, 400_000, 700_000, 300_000]
    assert "7" not in node.state.jobs


def test_a_policy_denial_names_the_rule_and_carries_the_decision(node: Node) -> None:
    with pytest.raises(Refusal) as err:
        node.prolog("7", [0], 400, partition="login")
    refusal = err.value
    assert (refusal.code, refusal.reason) == (
        "denied", "policy rule no-login: the login partition has no GPUs (rule no-login)")
    assert refusal.decision is not None and refusal.decision["action"] == "deny"
    assert refusal.context is not None and refusal.context["partition"] == "login"
    body, receipt = node.pipeline.reject(
        request_from({"op": "prolog", "job_id": "7", "gpus": [0], "partition": "login"}),
        ROOT, refusal, "scheduler", Origin())
    assert body == {"v": 1, "node": "n1", "source": "socket",
                    "requester": {"uid": 0, "user": "root", "role": "scheduler"},
                    "request": {"op": "prolog", "job_id": "7", "partition": "login",
                                "gpus": [0]},
                    "job_id": "7", "op": "prolog", "code": "denied", "reason": refusal.reason,
                    "decision": refusal.decision, "context": refusal.context}
    (record,) = node.ledger.records(kinds=["reject"])
    assert (record.seq, record.body) == (receipt.seq, body)
    assert node.limits() == [700_000] * 4


def test_a_refusal_without_decision_or_context_records_neither(node: Node) -> None:
    body, _ = node.pipeline.reject(request_from({"op": "cap", "job_id": "3", "watts": 300}),
                                   STRANGER, Refusal("not-found", "no"), "user", Origin())
    assert "decision" not in body and "context" not in body and "authority" not in body


@pytest.mark.parametrize(("fields", "rule"), [
    ({"account": "physics"}, "tenant:physics"),
    ({"qos": "low"}, "qos:low"),
    ({"comment": "spark:class=inference"}, "class:inference"),
])
def test_the_policy_judges_the_jobs_account_qos_and_class(
        node: Node, fields: dict[str, Any], rule: str) -> None:
    reply = node.prolog("7", [0], 650, **fields)
    assert reply["decision"]["rule"] == rule
    assert reply["decision"]["granted_mw"] == {"tenant:physics": 600_000, "qos:low": 400_000,
                                               "class:inference": 300_000}[rule]


def test_a_gpu_held_by_another_job_is_refused_before_the_policy_is_asked(
        node: Node) -> None:
    node.prolog("5", [1], 400)
    with pytest.raises(Refusal) as err:
        node.prolog("7", [1], 400, partition="login")  # a policy deny as well
    assert err.value.reason == "GPU 1 is already governed for job 5"
    assert err.value.context is not None and err.value.context["partition"] == "login"


def test_the_hardware_range_of_the_gpus_bounds_the_grant(node: Node) -> None:
    node.gpus.cards[0].high = 600_000
    node.gpus.cards[2].low = 250_000
    reply = node.prolog("7", [0, 1], 1300)  # 650 W each: over GPU 0's own maximum
    assert reply["decision"]["granted_mw"] == 600_000
    node.prolog("8", [2], 220)  # 220 W: under GPU 2's own minimum
    assert node.limits()[:3] == [600_000, 600_000, 250_000]


def test_a_prolog_without_watts_gets_the_default_marked_injected(node: Node) -> None:
    reply = node.prolog("7", [0, 1])
    assert reply["decision"]["granted_mw"] == 500_000
    assert reply["decision"]["injected"] is True
    assert "injected" not in node.prolog("8", [2], 300)["decision"]
