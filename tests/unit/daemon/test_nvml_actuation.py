"""The daemon's actuation (pipeline, monitor) on NvmlBackend over the fake libnvidia-ml.

The same Actuator, Pipeline and Monitor the daemon runs, with the GPU side going
through the real pynvml into the C fake; what happened to each GPU is read back
from the fake driver's state, and what was recorded from a real ledger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.daemon.actuation import Actuator
from spark_slurm.daemon.automations import Monitor
from spark_slurm.daemon.contracts import ReceiptLike
from spark_slurm.daemon.peers import Authority, Peer
from spark_slurm.daemon.pipeline import Origin, Pipeline, Refusal
from spark_slurm.daemon.requests import request_from
from spark_slurm.daemon.state import IntentStore, NodeState
from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.gpu.mapping import gres_conf_devices, slurm_device_map
from spark_slurm.ledger import Ledger
from spark_slurm.policy import Policy
from tests.conftest import FakeNvmlFactory
from tests.unit.gpu.fakenvml import FakeGpu, FakeNode, h100s

POLICY = """\
version: 1
gpu: {default_watts: 500, min_watts: 200, max_watts: 700}
thermal: {enabled: false}
"""
ROOT = Peer(0, 0, 1)


class Writer(LedgerWriter):
    """The daemon's writer, remembering what was queued so a test can wait for it."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.pending: list[Future[ReceiptLike]] = []

    def submit(self, kind: str, body: Mapping[str, Any]) -> Future[ReceiptLike]:
        future = super().submit(kind, body)
        self.pending.append(future)
        return future

    def flush(self) -> None:
        for future in self.pending:
            future.result(timeout=30)


@dataclass
class Node:
    driver: FakeNode
    pipeline: Pipeline
    monitor: Monitor
    ledger: Ledger
    writer: Writer

    def prolog(self, job: str, gpus: list[int], watts: int) -> dict[str, Any]:
        req = request_from({"op": "prolog", "job_id": job, "uid": 1000, "user": "alice",
                            "gpus": gpus, "watts": watts})
        return self.pipeline.prolog(req, ROOT, Origin())

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        self.writer.flush()
        return [r.body for r in self.ledger.records(kinds=[kind])]


Start = Callable[..., Node]


@pytest.fixture
def start(fake_nvml: FakeNvmlFactory, tmp_path: Path) -> Iterator[Start]:
    made: list[Node] = []

    def make(gpus: list[FakeGpu], gres_conf: str | None = None, **actuator: Any) -> Node:
        driver, gpu = fake_nvml(gpus)
        gres = None if gres_conf is None else gres_conf_devices(gres_conf, "n1")
        mapping, _ = slurm_device_map(gpu.devices(), gres)
        act = Actuator(gpu, slurm_map=mapping, **actuator)
        ledger = Ledger.open(tmp_path / f"l{len(made)}.db", node="n1")
        writer = Writer(ledger)
        writer.start()
        (tmp_path / f"i{len(made)}").mkdir()
        policy = Policy.from_text(POLICY)
        pipeline = Pipeline(node="n1", actuator=act, writer=writer, policy=lambda: policy,
                            state=NodeState(), intents=IntentStore(tmp_path / f"i{len(made)}"),
                            authority=Authority, context_source=None)
        node = Node(driver, pipeline, Monitor(pipeline, lambda: policy), ledger, writer)
        made.append(node)
        return node

    yield make
    for node in made:
        node.writer.stop()
        node.ledger.close()


def test_gres_conf_order_decides_which_gpu_is_capped(start: Start) -> None:
    # NVML order (PCI) has minors 0, 1, 2; gres.conf lists /dev/nvidia2 first.
    node = start(h100s(0, 1, 2), gres_conf="NodeName=n1 Name=gpu File=/dev/nvidia[2,0,1]\n")
    reply = node.prolog("7", [0], 400)
    assert reply["gpus"][0]["ok"]
    assert [node.driver.gpu(i, "requested_mw") for i in range(3)] == [700_000, 700_000,
                                                                     400_000]
    (cap,) = node.bodies("cap")
    assert cap["gpus"][0]["index"] == 0
    assert cap["gpus"][0]["uuid"] == node.driver.get("gpu2.uuid")


def test_a_mig_job_never_changes_a_parent_other_jobs_share(start: Start) -> None:
    node = start([FakeGpu(minor=0, bus=0x18, mig=1, mig_slices=2),
                  FakeGpu(minor=1, bus=0x28, mig=0)])
    assert sorted(node.pipeline.actuator.devices) == [0, 1, 2, 3]  # two slices: 2 and 3
    with pytest.raises(Refusal, match=r"shared with slices \[3\]"):
        node.prolog("1", [2], 300)
    assert node.driver.gpu(0, "requested_mw") == 700_000
    assert node.driver.calls("nvmlDeviceSetPowerManagementLimit") == 0
    reply = node.prolog("2", [2, 3], 800)  # both slices: the job owns the parent
    assert reply["gpus"][0]["ok"] and reply["gpus"][0]["index"] == 0
    assert node.driver.gpu(0, "requested_mw") == 400_000
    assert node.prolog("3", [1], 500)["gpus"][0]["ok"]
    (_, _, before) = node.pipeline.actuator.before(2)
    assert before is None  # a slice samples its parent despite util NOT_SUPPORTED


def test_driver_rounding_is_no_mismatch_and_no_drift(start: Start) -> None:
    gpus = h100s(0, 1, 2)
    for g in gpus:
        g.extra["round_mw"] = 1000
    node = start(gpus)
    reply = node.prolog("4", [0, 1, 2], 1000)  # 333333 mW each, stored as 333000
    assert [(g["intended_mw"], g["readback_mw"], g["ok"]) for g in reply["gpus"]] == [
        (333_333, 333_000, True)] * 3
    (cap,) = node.bodies("cap")
    assert {g["readback"] for g in cap["gpus"]} == {"rounded"}
    node.monitor.tick()
    node.monitor.tick()
    assert node.bodies("fault") == [] and node.bodies("drift") == []


def test_a_lower_limiter_is_recorded_once_not_as_repeated_drift(start: Start) -> None:
    gpus = h100s(0)
    gpus[0].extra["other_limit_mw"] = 300_000  # the BMC holds the GPU at 300 W
    node = start(gpus)
    (entry,) = node.prolog("5", [0], 500)["gpus"]
    assert (entry["readback_mw"], entry["ok"]) == (300_000, True)
    (cap,) = node.bodies("cap")
    assert cap["gpus"][0]["readback"] == "lower-limiter"
    assert cap["gpus"][0]["requested_readback_mw"] == 500_000
    node.monitor.tick()
    assert node.bodies("fault") == [] and node.bodies("drift") == []
    node.driver.set_gpu(0, other_limit_mw=250_000)  # the BMC lowers it further mid-job
    for _ in range(3):
        node.monitor.tick()
    (drift,) = node.bodies("drift")
    assert (drift["cause"], drift["action"]) == ("lower-limiter", "observe")
    assert (drift["expected_mw"], drift["observed_mw"]) == (500_000, 250_000)
    assert node.driver.gpu(0, "requested_mw") == 500_000  # nothing to reconcile
    # An admin's nvidia-smi -pl under the BMC's limit shows once the BMC lets go.
    node.driver.set_gpu(0, requested_mw=650_000)
    node.monitor.tick()
    node.driver.set_gpu(0, other_limit_mw=0)
    node.monitor.tick()
    assert [d["cause"] for d in node.bodies("drift")] == ["lower-limiter", "out-of-band"]
    assert node.driver.gpu(0, "requested_mw") == 500_000  # reconciled


def test_a_lost_gpu_is_a_fault_then_a_recovery_after_nvml_comes_back(start: Start) -> None:
    node = start(h100s(0, 1))
    node.prolog("6", [1], 400)
    node.monitor.tick()
    node.driver.set_gpu(1, lost=1)
    node.monitor.tick()
    (fault,) = node.bodies("fault")
    assert fault["gpu"] == 1 and "GpuLost" in fault["error"]
    assert fault["expected_mw"] == 400_000
    time.sleep(0.5)  # an outage at least a monitor period long, as on a real node
    node.driver.set_gpu(1, lost=0, epoch=1)  # a GPU reset: old handles stay invalid
    node.monitor.tick()
    (recovery,) = node.bodies("recovery")
    assert recovery["held"] is True and recovery["enforced_mw"] == 400_000
    assert node.bodies("drift") == []


def test_persistence_is_checked_recorded_and_set_when_asked(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    gpus = h100s(0, 1)
    gpus[1].persistence = 0
    node = start(gpus)
    act = node.pipeline.actuator
    with caplog.at_level(logging.WARNING, logger="sparkd.actuation"):
        assert act.check_persistence() == {0: True, 1: False}
    assert any("GPU 1: persistence mode is off" in r.message for r in caplog.records)
    assert node.driver.gpu(1, "persistence") == 0  # only checked
    node.prolog("8", [1], 400)
    (cap,) = node.bodies("cap")
    assert cap["gpus"][0]["before"]["persistence"] is False
    assert act.check_persistence(enable=True) == {0: True, 1: True}
    assert node.driver.gpu(1, "persistence") == 1


def test_a_lost_gpu_does_not_stop_the_others_being_looked_at(start: Start) -> None:
    node = start(h100s(0, 1))
    node.prolog("6", [1], 400)
    node.driver.set_gpu(0, lost=1)
    monitor = Monitor(node.pipeline, node.monitor.policy, period_s=3600)
    monitor.start()  # GPU 0 gives no baseline; GPU 1 still does
    monitor.stop()
    node.driver.set_gpu(1, requested_mw=650_000)
    monitor.tick()
    (fault,) = node.bodies("fault")
    (drift,) = node.bodies("drift")
    assert fault["gpu"] == 0 and "last_seen_ns" not in fault
    assert (drift["gpu"], drift["observed_mw"], drift["cause"]) == (1, 650_000, "out-of-band")
    assert "last_seen" in drift  # start's reading of GPU 1
    assert node.driver.gpu(1, "requested_mw") == 400_000


def test_a_reconcile_the_driver_rounds_away_is_recorded_once(start: Start) -> None:
    node = start(h100s(0))
    assert node.prolog("7", [0], 405)["gpus"][0]["ok"]
    node.monitor.tick()
    node.driver.set_gpu(0, round_mw=10_000, requested_mw=650_000)  # 10 W steps from now on
    for _ in range(3):
        node.monitor.tick()
    (drift,) = node.bodies("drift")  # what it could do is recorded, not retried each look
    assert (drift["observed_mw"], drift["readback_mw"], drift["ok"]) == (
        650_000, 400_000, False)
    assert node.driver.gpu(0, "requested_mw") == 400_000
