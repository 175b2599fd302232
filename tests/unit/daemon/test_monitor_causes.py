"""The monitor's judgements, stepped by hand on NvmlBackend over the pynvml stand-in:
which cause a drift is given, and whether a driver outage proves the ceiling held.

In-process and on a manual clock, so the energy used over an outage is exact.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.actuation import Actuator
from spark_slurm.daemon.automations import Monitor
from spark_slurm.daemon.peers import Authority, Peer
from spark_slurm.daemon.pipeline import Origin, Pipeline
from spark_slurm.daemon.requests import request_from
from spark_slurm.daemon.state import IntentStore, NodeState
from spark_slurm.gpu.nvml import NvmlBackend
from spark_slurm.ledger import Ledger
from spark_slurm.policy import Policy
from tests.unit.daemon.test_nvml_actuation import POLICY, Writer
from tests.unit.gpu import fake_nvml as fn
from tests.unit.gpu.fake_nvml import FakeDevice, FakeNvml


@dataclass
class Rig:
    clock: ManualClock
    fake: FakeNvml
    gpu: FakeDevice  # Slurm GPU 0 (minor 0) is NVML device 1
    monitor: Monitor
    writer: Writer
    ledger: Ledger
    counted: list[str]  # what the monitor counted (sparkd's metrics), in order

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        """PERs of a kind about Slurm GPU 0 (the stand-in's faults hit every GPU)."""
        self.writer.flush()
        return [r.body for r in self.ledger.records(kinds=[kind])
                if r.body.get("gpu", 0) == 0]


@contextlib.contextmanager
def rigged(tmp_path: Path, policy_text: str = POLICY) -> Iterator[Rig]:
    """Job 9 holds Slurm GPU 0 at 400 W under `policy_text`; one look already taken."""
    clock = ManualClock()
    fake = fn.h100_node(2)
    backend = NvmlBackend(nvml=fake, clock=clock)
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = Writer(ledger)
    writer.start()
    policy = Policy.from_text(policy_text)
    pipeline = Pipeline(node="n1", actuator=Actuator(backend, clock=clock), writer=writer,
                        policy=lambda: policy, state=NodeState(),
                        intents=IntentStore(tmp_path), authority=Authority,
                        context_source=None)
    req = request_from({"op": "prolog", "job_id": "9", "uid": 1000, "user": "alice",
                        "gpus": [0], "watts": 400})
    assert pipeline.prolog(req, Peer(0, 0, 1), Origin())["gpus"][0]["ok"]
    counted: list[str] = []
    monitor = Monitor(pipeline, lambda: policy, count=counted.append)
    made = Rig(clock, fake, fake.devices[1], monitor, writer, ledger, counted)
    assert made.gpu.requested_mw == 400_000
    monitor.tick()  # the last good reading before whatever the test does
    try:
        yield made
    finally:
        writer.stop()
        ledger.close()
        backend.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with rigged(tmp_path) as made:
        yield made


def test_an_out_of_band_set_to_the_default_limit_is_out_of_band(rig: Rig) -> None:
    rig.clock.advance(1)
    rig.gpu.requested_mw = rig.gpu.default_mw  # nvidia-smi -pl 700: the driver stayed up
    rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert (drift["cause"], drift["energy_reset"]) == ("out-of-band", False)
    assert drift["observed_mw"] == 700_000 and rig.gpu.requested_mw == 400_000  # reconciled


def test_a_driver_reload_resets_the_counter_and_the_limit(rig: Rig) -> None:
    rig.clock.advance(1)
    rig.gpu.requested_mw = rig.gpu.default_mw
    rig.gpu.energy_mj = 0
    rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert (drift["cause"], drift["energy_reset"]) == ("driver-reload", True)


def test_a_counter_reset_with_a_limit_other_than_the_default_is_not_a_reload(
        rig: Rig) -> None:
    rig.clock.advance(1)
    rig.gpu.requested_mw = 650_000
    rig.gpu.energy_mj = 0
    rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert drift["cause"] == "out-of-band"


def _outage(rig: Rig, seconds: int, avg_mw: int) -> dict[str, Any]:
    """The GPU is lost, comes back `seconds` later having used `avg_mw` on average."""
    start_mj = rig.gpu.energy_mj
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    rig.monitor.tick()
    (fault,) = rig.bodies("fault")
    assert fault["expected_mw"] == 400_000
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(seconds)
    per_read = min(rig.gpu.demand_mw, rig.gpu.enforced_mw) // 10  # the stand-in's own step
    rig.gpu.energy_mj = start_mj + avg_mw * seconds - per_read  # mW x s = mJ
    rig.monitor.tick()
    (recovery,) = rig.bodies("recovery")
    return recovery


def test_an_outage_at_the_ceiling_held_it(rig: Rig) -> None:
    body = _outage(rig, 10, 400_000)
    assert body["held"] is True
    assert body["outage_avg_power_mw"] == 400_000 and body["outage_slack_mw"] == 20_000


def test_an_outage_above_the_ceiling_did_not_hold_it(rig: Rig) -> None:
    body = _outage(rig, 10, 600_000)  # 1.5x the ceiling: well under 2x, well over 5 %
    assert body["held"] is False and body["outage_avg_power_mw"] == 600_000


def test_just_over_the_slack_did_not_hold_it(rig: Rig) -> None:
    assert _outage(rig, 10, 420_100)["held"] is False


def test_a_counter_reset_over_the_outage_proves_nothing(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    rig.monitor.tick()
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(5)
    rig.gpu.energy_mj = 0
    rig.monitor.tick()
    (body,) = rig.bodies("recovery")
    assert (body["held"], body["energy_reset"]) == (False, True)


def test_exactly_the_slack_over_the_ceiling_still_held_it(rig: Rig) -> None:
    assert _outage(rig, 10, 420_000)["held"] is True  # 400 W + 5 %, inclusive


def test_a_wide_read_back_tolerance_is_the_least_slack(tmp_path: Path) -> None:
    with rigged(tmp_path) as rig:
        rig.monitor.actuator.tolerance_mw = 30_000  # sparkd's readback_tolerance_mw
        body = _outage(rig, 10, 430_000)
        assert (body["outage_slack_mw"], body["held"]) == (30_000, True)


def test_a_lost_gpu_is_recorded_once_and_its_recovery_links_the_fault(rig: Rig) -> None:
    seen_ns = rig.clock.now_ns()
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    for _ in range(3):
        rig.clock.advance(2)
        rig.monitor.tick()
    (fault,) = rig.bodies("fault")
    error = fault.pop("error")
    assert "NVML error code 15" in error  # GPU_IS_LOST, as the driver said it
    assert fault == {
        "v": 1, "node": "n1", "gpu": 0, "job_id": "9", "source": "automation",
        "authority": "automation:fault",
        "requester": {"uid": 0, "user": "sparkd", "role": "automation"},
        "expected_mw": 400_000, "last_seen_ns": seen_ns}
    assert 0 in rig.monitor.state.faults  # `sparkctl status` shows the GPU faulted
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(4)
    rig.monitor.tick()
    (recovery,) = rig.bodies("recovery")
    (record,) = (r for r in rig.ledger.records(kinds=["fault"]) if r.body["gpu"] == 0)
    assert recovery["ref"] == {"seq": record.seq, "hash": record.hash}
    assert recovery["authority"] == "automation:fault" and recovery["job_id"] == "9"
    assert (recovery["outage_ns"], recovery["enforced_mw"], recovery["expected_mw"]) == (
        10_000_000_000, 400_000, 400_000)
    assert (recovery["energy_reset"], recovery["held"]) == (False, True)
    assert 0 not in rig.monitor.state.faults
    assert rig.counted == ["fault", "fault", "recovery", "recovery"]  # both GPUs, once each
    rig.monitor.tick()
    assert len(rig.bodies("recovery")) == 1


def test_an_ungoverned_gpu_s_recovery_claims_no_ceiling(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    rig.monitor.tick()
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(5)
    rig.monitor.tick()
    rig.writer.flush()
    fault, = (r.body for r in rig.ledger.records(kinds=["fault"]) if r.body["gpu"] == 1)
    recovery, = (r.body for r in rig.ledger.records(kinds=["recovery"]) if r.body["gpu"] == 1)
    assert "expected_mw" not in fault and "job_id" not in fault
    assert "expected_mw" not in recovery and "outage_slack_mw" not in recovery
    assert recovery["held"] is False and recovery["outage_avg_power_mw"] > 0


def test_a_gpu_lost_before_the_first_reading_proves_nothing(rig: Rig) -> None:
    fresh = Monitor(rig.monitor.pipeline, rig.monitor.policy)  # no reading taken yet
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    fresh.tick()
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(5)
    fresh.tick()
    (fault,) = rig.bodies("fault")
    (recovery,) = rig.bodies("recovery")
    assert "last_seen_ns" not in fault
    assert recovery["held"] is False and recovery["enforced_mw"] == 400_000
    assert not {"outage_ns", "energy_reset", "outage_avg_power_mw"} & set(recovery)


def test_start_takes_the_baseline_a_reload_is_judged_against(rig: Rig) -> None:
    fresh = Monitor(rig.monitor.pipeline, rig.monitor.policy, period_s=3600)
    baseline = {"time_ns": rig.clock.now_ns(), "energy_mj": rig.gpu.energy_mj + 40_000,
                "energy_epoch": 0}  # start's own reading adds the stand-in's 100 ms step
    fresh.start()
    try:
        rig.gpu.requested_mw = rig.gpu.default_mw  # the driver reloads before the first look
        rig.gpu.energy_mj = 0
        rig.clock.advance(1)
        fresh.tick()
    finally:
        fresh.stop()
    assert not fresh._thread.is_alive()
    (drift,) = rig.bodies("drift")
    assert (drift["cause"], drift["energy_reset"]) == ("driver-reload", True)
    assert drift["last_seen"] == baseline


def test_a_started_monitor_looks_by_itself_each_period(rig: Rig) -> None:
    fresh = Monitor(rig.monitor.pipeline, rig.monitor.policy, period_s=0.05)
    fresh.start()
    try:
        rig.gpu.requested_mw = 650_000
        deadline = time.monotonic() + 3
        while rig.gpu.requested_mw != 400_000 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        fresh.stop()
    assert rig.gpu.requested_mw == 400_000  # found and reconciled without a hand tick
    assert fresh._thread.daemon  # a sparkd that dies without its shutdown still exits


def test_a_counter_that_did_not_move_is_no_restart(rig: Rig) -> None:
    """NVML's energy counter updates at its own interval: two close reads can be equal."""
    rig.gpu.demand_mw = 0  # the stand-in then adds nothing per read
    rig.gpu.requested_mw = rig.gpu.default_mw
    rig.clock.advance(1)
    rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert (drift["cause"], drift["energy_reset"]) == ("out-of-band", False)


def test_an_outage_with_a_counter_that_did_not_move_held_the_ceiling(rig: Rig) -> None:
    rig.gpu.demand_mw = 0
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    rig.monitor.tick()
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(10)
    rig.monitor.tick()
    (body,) = rig.bodies("recovery")
    assert (body["energy_reset"], body["outage_avg_power_mw"], body["held"]) == (False, 0, True)


def test_a_restart_another_reader_saw_first_still_voids_the_proof(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    rig.monitor.tick()
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.gpu.energy_mj = 0
    rig.monitor.actuator.gpu.sample(1)  # the sampler sees the restart before the monitor
    rig.gpu.energy_mj = 10_000_000  # and the counter has climbed past where it was
    rig.clock.advance(10)
    rig.monitor.tick()
    (body,) = rig.bodies("recovery")
    assert (body["energy_reset"], body["held"]) == (True, False)
    assert "outage_avg_power_mw" not in body
