"""The monitor's judgements, stepped by hand on NvmlBackend over the pynvml stand-in:
which cause a drift is given, and whether a driver outage proves the ceiling held.

In-process and on a manual clock, so the energy used over an outage is exact.
"""

from __future__ import annotations

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

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        """PERs of a kind about Slurm GPU 0 (the stand-in's faults hit every GPU)."""
        self.writer.flush()
        return [r.body for r in self.ledger.records(kinds=[kind])
                if r.body.get("gpu", 0) == 0]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    clock = ManualClock()
    fake = fn.h100_node(2)
    backend = NvmlBackend(nvml=fake, clock=clock)
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = Writer(ledger)
    writer.start()
    policy = Policy.from_text(POLICY)
    pipeline = Pipeline(node="n1", actuator=Actuator(backend, clock=clock), writer=writer,
                        policy=lambda: policy, state=NodeState(),
                        intents=IntentStore(tmp_path), authority=Authority,
                        context_source=None)
    req = request_from({"op": "prolog", "job_id": "9", "uid": 1000, "user": "alice",
                        "gpus": [0], "watts": 400})
    assert pipeline.prolog(req, Peer(0, 0, 1), Origin())["gpus"][0]["ok"]
    monitor = Monitor(pipeline, lambda: policy)
    made = Rig(clock, fake, fake.devices[1], monitor, writer, ledger)
    assert made.gpu.requested_mw == 400_000
    monitor.tick()  # the last good reading before whatever the test does
    yield made
    writer.stop()
    ledger.close()
    backend.close()


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
