"""The pipeline with an in-test GPU fake: MIG parents, set failures, authority for `cap`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.actuation import Actuator
from spark_slurm.daemon.context import class_from_comment, parse_token
from spark_slurm.daemon.peers import Authority, Peer
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.requests import request_from
from spark_slurm.daemon.state import IntentStore, NodeState, Throttle
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import GpuNoPermission
from spark_slurm.gpu.backend import DeviceInfo, PowerLimits, Sample
from spark_slurm.ledger import Ledger
from spark_slurm.policy import Policy
from tests.unit.daemon.test_pipeline_record import OWNER, SHA, STRANGER, Node, reading

POLICY = """\
version: 1
gpu: {default_watts: 500, min_watts: 200, max_watts: 700}
permissions: {owner_may: lower, admin_group: no-such-group-here}
"""


class FakeGpus:
    """GPU 0 is a whole GPU whose backend devices 1 and 2 are MIG slices (with the
    parent's minor number, as NVML reports them); GPU 3 refuses sets. Slurm numbers
    the slices after the highest minor: 4 and 5."""

    def __init__(self) -> None:
        self.limit = {0: 700_000, 1: 700_000, 2: 700_000, 3: 700_000}
        self.sets: list[tuple[int, int]] = []

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(0, 0, "0:0", "GPU-P", "fake"),
                DeviceInfo(1, 0, "0:0", "MIG-1", "fake", mig_parent="GPU-P"),
                DeviceInfo(2, 0, "0:0", "MIG-2", "fake", mig_parent="GPU-P"),
                DeviceInfo(3, 3, "0:3", "GPU-3", "fake")]

    def limits(self, index: int) -> PowerLimits:
        return PowerLimits(100_000, 700_000, 700_000, self.limit[index], self.limit[index])

    def sample(self, index: int) -> Sample:
        return Sample(1, 50_000, 1_000, 30_000, 0, 0, self.limit[index])

    def set_power_limit(self, index: int, mw: int) -> None:
        if index == 3:
            raise GpuNoPermission("not allowed", index)
        self.sets.append((index, mw))
        self.limit[index] = mw

    def persistence_mode(self, index: int) -> bool | None:
        return True

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        raise AssertionError("the pipeline never changes persistence mode")

    def close(self) -> None:
        pass


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Pipeline, FakeGpus, Ledger]]:
    gpus = FakeGpus()
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = LedgerWriter(ledger)
    writer.start()
    policy = Policy.from_text(POLICY)
    pipeline = Pipeline(node="n1", actuator=Actuator(gpus), writer=writer,
                        policy=lambda: policy, state=NodeState(), intents=IntentStore(tmp_path),
                        authority=Authority, context_source=None)
    yield pipeline, gpus, ledger
    writer.stop()
    ledger.close()


ROOT = Peer(0, 0, 1)


def _prolog(pipeline: Pipeline, job: str, gpus: list[int], watts: int) -> dict[str, object]:
    req = request_from({"op": "prolog", "job_id": job, "uid": 1000, "user": "alice",
                        "gpus": gpus, "watts": watts})
    return pipeline.prolog(req, ROOT, Origin())


def test_a_mig_slice_never_changes_a_shared_parent(setup: tuple[Pipeline, FakeGpus, Ledger]
                                                   ) -> None:
    pipeline, gpus, _ = setup
    assert sorted(pipeline.actuator.devices) == [0, 3, 4, 5]  # both slices, told apart
    with pytest.raises(Refusal) as err:
        _prolog(pipeline, "1", [4], 400)
    assert err.value.code == "denied"
    assert "shared with slices [5]" in err.value.reason
    assert err.value.context is not None and err.value.context["gpus"] == [4]
    assert gpus.sets == []
    reply = _prolog(pipeline, "2", [4, 5], 800)  # the job holds every slice: the parent moves
    assert reply["ok"] and gpus.sets == [(0, 400_000)]


def test_a_failed_set_is_recorded_per_gpu_and_not_governed(
        setup: tuple[Pipeline, FakeGpus, Ledger]) -> None:
    pipeline, _, ledger = setup
    reply = _prolog(pipeline, "3", [3], 400)
    entries = reply["gpus"]
    assert isinstance(entries, list)
    (entry,) = entries
    assert entry["ok"] is False and "GpuNoPermission" in entry["error"]
    assert 3 not in pipeline.state.governed
    (cap,) = [r for r in ledger.records(kinds=["cap"])]
    assert cap.body["gpus"][0]["readback_mw"] == 700_000


def test_cap_authority_owner_other_and_unknown_job(setup: tuple[Pipeline, FakeGpus, Ledger]
                                                   ) -> None:
    pipeline, gpus, _ = setup
    _prolog(pipeline, "4", [4, 5], 1000)  # 500 W on the parent
    cap = request_from({"op": "cap", "job_id": "4", "watts_per_gpu": 300})
    reply = pipeline.cap(cap, Peer(1000, 1000, 5), Origin())
    assert reply["decision"]["action"] == "allow" and gpus.limit[0] == 300_000
    with pytest.raises(Refusal) as err:
        pipeline.cap(cap, Peer(1001, 1001, 5), Origin())
    assert err.value.code == "forbidden"
    with pytest.raises(Refusal) as err:
        pipeline.cap(request_from({"op": "cap", "job_id": "5", "watts": 300}), ROOT, Origin())
    assert err.value.code == "not-found"


def test_admission_token_and_class_parsing() -> None:
    token = parse_token("note spark:v=1,watts=1600,gpus=4,wpg=400,class=training,rule=r1,"
                        "policy=abcd,injected=0")
    assert token == {"v": 1, "watts": 1600, "gpus": 4, "wpg": 400, "class": "training",
                     "rule": "r1", "policy": "abcd", "injected": 0}
    assert parse_token("nothing here") is None and parse_token(None) is None
    assert class_from_comment("spark:class=inference") == "inference"


class _Sampler:
    """A sampler whose newest reading is whatever the test put there."""

    def __init__(self, reading: Sample) -> None:
        self.reading = reading

    def latest(self, index: int) -> Sample:
        return self.reading


def test_a_stale_sampler_reading_is_not_passed_off_as_fresh() -> None:
    clock = ManualClock()
    cached = Sample(clock.now_ns(), 99_000, 5_000, 40_000, 90, 0, 700_000)
    actuator = Actuator(FakeGpus(), _Sampler(cached), max_sample_age_ns=250_000_000,
                        clock=clock)
    clock.advance(0.2)
    assert actuator.sample(0) is cached  # recent enough: no driver call
    clock.advance(0.1)
    direct = actuator.sample(0)  # 300 ms old: read the GPU instead
    assert direct is not cached and direct.power_mw == 50_000


# -- cap: who may, what is recorded (the pipeline of test_pipeline_record) ------------

def test_a_cap_records_who_asked_and_leaves_the_restore_target(node: Node) -> None:
    node.prolog("7", [0, 1], 1000)
    node.state.reported[1] = 1  # a drift report of the old limit
    started = time.time_ns()
    reply = node.cap("7", id=3, watts_per_gpu=300, reason="cooling")
    cap = node.bodies("cap")[1]
    assert started <= cap.pop("changed_ns") <= time.time_ns()
    decision = {"action": "allow", "rule": "admin-hw-limits",
                "reason": "admin request of 300 W/GPU within hardware limits",
                "requested_mw": 300_000,
                "granted_mw": 300_000, "policy_sha256": SHA}
    assert cap == {
        "v": 1, "node": "n1", "source": "socket", "authority": "root", "job_id": "7",
        "requester": {"uid": 0, "user": "root", "role": "admin"},
        "request": {"op": "cap", "job_id": "7", "reason": "cooling", "per_gpu_mw": 300_000},
        "op": "cap", "context": {"job_id": "7", "gpus": [0, 1], "status": "ok",
                                 "user": "alice", "uid": 1000},
        "decision": decision, "reason": "cooling",
        "gpus": [{"index": g, "uuid": f"GPU-{g}", "intended_mw": 300_000,
                  "readback_mw": 300_000, "ok": True, "before": reading(limit=500_000),
                  "previous_mw": 500_000} for g in (0, 1)],
        "paths": {"telemetry": "ok", "context": "ok", "facility": "pending",
                  "policy": "allow", "ledger": "committed"}}
    assert reply["decision"] == decision and reply["id"] == 3
    assert node.state.governed == {0: 300_000, 1: 300_000}
    job = node.state.jobs["7"]
    assert job.granted_mw == 300_000 and job.previous_mw == {0: 700_000, 1: 700_000}
    assert [f[0] for f in node.follow_ups] == ["cap", "cap"]
    assert node.follow_ups[1][2:] == ([0, 1], node.bodies("cap")[1]["changed_ns"], "7")


def test_node_watts_in_a_cap_are_shared_by_the_jobs_gpus(node: Node) -> None:
    node.prolog("7", [0, 1], 1000)
    node.cap("7", watts=700)
    assert node.limits()[:2] == [350_000, 350_000]
    assert node.bodies("cap")[1]["reason"] == ""


@pytest.mark.parametrize(("peer", "role", "authority"), [
    (Peer(4321, os.getgid(), 9), "admin", "admin-group"),
    (OWNER, "owner", "job-owner"),
])
def test_a_cap_names_the_role_it_was_allowed_under(
        node: Node, peer: Peer, role: str, authority: str) -> None:
    node.prolog("7", [0], 500)
    node.cap("7", peer, watts_per_gpu=300)
    cap = node.bodies("cap")[1]
    assert (cap["requester"]["role"], cap["requester"]["uid"], cap["authority"]) == (
        role, peer.uid, authority)


def test_a_stranger_or_a_raising_owner_is_refused_and_nothing_moves(node: Node) -> None:
    node.prolog("7", [0], 500)
    with pytest.raises(Refusal) as err:
        node.cap("7", STRANGER, watts_per_gpu=300)
    assert (err.value.code, err.value.reason) == (
        "forbidden", "uid 1001 is neither the owner of job 7 nor in the admin group")
    with pytest.raises(Refusal) as err:
        node.cap("7", OWNER, watts_per_gpu=600)  # owner_may: lower
    assert (err.value.code, err.value.role) == ("denied", "owner")
    assert err.value.reason.startswith("policy rule ")
    assert err.value.decision is not None and err.value.decision["action"] == "deny"
    assert err.value.context is not None and err.value.context["job_id"] == "7"
    with pytest.raises(Refusal, match=r"^job 8 holds no cap on node n1$"):
        node.cap("8", watts_per_gpu=300)
    assert node.limits()[0] == 500_000 and len(node.bodies("cap")) == 1


def test_a_job_without_a_uid_has_no_owner(node: Node) -> None:
    node.pipeline.prolog(request_from({"op": "prolog", "job_id": "7", "gpus": [0],
                                       "watts": 500}), ROOT, Origin())
    with pytest.raises(Refusal, match="neither the owner"):
        node.cap("7", OWNER, watts_per_gpu=300)


def test_a_cap_on_a_gpu_that_cannot_be_read_restores_from_the_grant(node: Node) -> None:
    node.prolog("7", [0, 1], 1000)
    node.gpus.cards[1].fail.add("sample")
    node.gpus.cards[0].fail.add("refuse")
    node.gpus.cards[0].enforced = 450_000  # another limiter holds it under the grant
    node.cap("7", watts_per_gpu=300)
    first, second = node.bodies("cap")[1]["gpus"]
    assert second["previous_mw"] == 500_000 and second["before"] == {}
    assert first["previous_mw"] == 450_000  # what was enforced, not the grant
    assert "error" in first and node.state.governed == {0: 500_000, 1: 300_000}


def test_a_cap_under_a_thermal_throttle_keeps_the_throttle(node: Node) -> None:
    node.prolog("7", [0], 500)
    node.state.throttled[0] = Throttle(base_mw=500_000, to_mw=350_000, ref=None)
    node.gpus.cards[0].requested = 350_000
    node.cap("7", watts_per_gpu=400)
    assert node.limits()[0] == 350_000 and node.state.throttled[0].base_mw == 400_000


def test_a_cap_the_driver_does_not_take_is_a_fault_of_the_job(node: Node) -> None:
    node.prolog("7", [0], 500)
    node.gpus.cards[0].enforced = 650_000
    node.cap("7", watts_per_gpu=400)
    (fault,) = node.bodies("fault")
    assert (fault["job_id"], fault["gpu"], fault["expected_mw"]) == ("7", 0, 400_000)


def test_a_cap_is_judged_with_the_jobs_own_context_and_per_gpu_watts_win(
        node: Node) -> None:
    node.prolog("7", [0, 1, 2], 1200, account="physics", partition="gpu", qos="normal",
                comment="spark:class=training")
    node.cap("7", watts=1000)  # 333.333 W each, floored to the milliwatt
    node.cap("7", watts=900, watts_per_gpu=250)
    first, second = node.bodies("cap")[1:]
    assert first["context"] == {"job_id": "7", "gpus": [0, 1, 2], "status": "ok",
                                "user": "alice", "uid": 1000, "account": "physics",
                                "partition": "gpu", "qos": "normal", "class": "training"}
    assert [e["intended_mw"] for e in first["gpus"]] == [333_333] * 3
    assert first["decision"]["requested_mw"] == 333_333
    assert [e["intended_mw"] for e in second["gpus"]] == [250_000] * 3
