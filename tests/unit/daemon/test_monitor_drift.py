"""Drift, stepped by hand: what the drift PER records, the policy's `drift.action`,
and how often one observation is recorded.

Job 9 holds Slurm GPU 0 at 400 W on NvmlBackend over the pynvml stand-in (see
test_monitor_causes); an admin's `nvidia-smi -pl 650` is the usual drift.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from tests.unit.daemon.test_monitor_causes import Rig, rigged
from tests.unit.gpu import fake_nvml as fn

RECORD = """\
version: 1
gpu: {default_watts: 500, min_watts: 200, max_watts: 700}
thermal: {threshold_c: 85, release_c: 75}
drift: {action: record}
"""


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with rigged(tmp_path) as made:
        yield made


def _now(clock: ManualClock) -> int:
    return clock.now_ns()


def test_a_reconciled_drift_records_what_was_seen_and_puts_the_limit_back(
        tmp_path: Path) -> None:
    with rigged(tmp_path) as rig:
        seen = {"time_ns": _now(rig.clock), "energy_mj": rig.gpu.energy_mj, "energy_epoch": 0}
        rig.clock.advance(1)
        rig.gpu.requested_mw = 650_000
        rig.monitor.tick()
        (drift,) = rig.bodies("drift")
        assert drift == {
            "v": 1, "node": "n1", "gpu": 0, "job_id": "9", "source": "automation",
            "authority": "automation:drift",
            "requester": {"uid": 0, "user": "sparkd", "role": "automation"},
            "expected_mw": 400_000, "observed_mw": 650_000, "requested_mw": 650_000,
            "cause": "out-of-band", "action": "reconcile", "energy_reset": False,
            "energy_mj": rig.gpu.energy_mj, "energy_epoch": 0, "last_seen": seen,
            "readback_mw": 400_000, "ok": True}
        assert rig.gpu.requested_mw == 400_000 and rig.counted == ["drift"]
        rig.monitor.tick()
        assert len(rig.bodies("drift")) == 1


def test_a_refused_reconcile_is_recorded_once_per_observation(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceSetPowerManagementLimit"] = fn.NVML_ERROR_NO_PERMISSION
    rig.gpu.requested_mw = 650_000
    for _ in range(3):
        rig.clock.advance(1)
        rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert (drift["ok"], drift["readback_mw"]) == (False, 650_000)
    assert "NVML error code 4" in drift["error"]  # NO_PERMISSION, as the driver said it
    rig.gpu.requested_mw = 600_000  # a new observation is a new record
    rig.monitor.tick()
    rig.monitor.tick()
    assert [d["observed_mw"] for d in rig.bodies("drift")] == [650_000, 600_000]
    assert rig.counted == ["drift", "drift"]


def test_a_reconcile_that_reads_back_lower_is_not_recorded_again(rig: Rig) -> None:
    rig.gpu.requested_mw = 650_000
    rig.gpu.other_limiter_mw = 300_000  # the set takes, but another limiter holds 300 W
    rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert (drift["observed_mw"], drift["readback_mw"], drift["ok"]) == (
        300_000, 300_000, True)
    assert rig.gpu.requested_mw == 400_000
    rig.monitor.tick()
    rig.monitor.tick()
    assert len(rig.bodies("drift")) == 1


def test_the_drift_is_over_once_the_limit_agrees_again(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceSetPowerManagementLimit"] = fn.NVML_ERROR_NO_PERMISSION
    rig.gpu.requested_mw = 650_000
    rig.monitor.tick()
    rig.gpu.requested_mw = 400_000  # the admin put it back by hand
    rig.monitor.tick()
    rig.gpu.requested_mw = 650_000  # and moved it again: a second drift
    rig.monitor.tick()
    assert [d["observed_mw"] for d in rig.bodies("drift")] == [650_000, 650_000]


def test_drift_record_accepts_the_new_limit_and_clears_a_throttle(tmp_path: Path) -> None:
    with rigged(tmp_path, RECORD) as rig:
        rig.gpu.temp_c = 90
        rig.monitor.tick()
        assert rig.gpu.requested_mw == 280_000  # throttled
        rig.gpu.requested_mw = 650_000
        rig.monitor.tick()
        (drift,) = rig.bodies("drift")
        assert (drift["expected_mw"], drift["observed_mw"], drift["action"]) == (
            280_000, 650_000, "record")
        assert drift["throttle_cleared"] is True
        assert "readback_mw" not in drift and "ok" not in drift
        assert rig.gpu.requested_mw == 650_000
        rig.gpu.temp_c = 60  # cooled: there is no throttle left to release
        rig.monitor.tick()
        rig.monitor.tick()
        assert rig.bodies("release") == [] and len(rig.bodies("drift")) == 1
        assert rig.gpu.requested_mw == 650_000
        assert rig.monitor.state.governed[0] == 650_000


def test_drift_record_without_a_throttle_says_nothing_was_cleared(tmp_path: Path) -> None:
    with rigged(tmp_path, RECORD) as rig:
        rig.gpu.requested_mw = 650_000
        rig.monitor.tick()
        (drift,) = rig.bodies("drift")
        assert drift["action"] == "record" and "throttle_cleared" not in drift


def test_a_counter_that_restarted_between_looks_is_a_reload(rig: Rig) -> None:
    """The sampler reads more often than the monitor: by the monitor's next look the
    restarted counter may have climbed past where it was; the epoch still tells."""
    rig.gpu.requested_mw = rig.gpu.default_mw
    rig.gpu.energy_mj = 0
    rig.monitor.actuator.gpu.sample(1)  # another reader sees the restart first
    rig.gpu.energy_mj = 10_000_000
    rig.clock.advance(1)
    rig.monitor.tick()
    (drift,) = rig.bodies("drift")
    assert (drift["cause"], drift["energy_reset"], drift["energy_epoch"]) == (
        "driver-reload", True, 1)


def test_a_limit_changed_while_the_gpu_was_lost_is_gpu_lost(rig: Rig) -> None:
    rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    rig.monitor.tick()
    del rig.fake.fail["nvmlDeviceGetPowerUsage"]
    rig.clock.advance(5)
    rig.gpu.requested_mw = 650_000  # came back with another limit, counter running on
    rig.monitor.tick()
    (recovery,) = rig.bodies("recovery")
    assert (recovery["held"], recovery["enforced_mw"]) == (False, 650_000)
    (drift,) = rig.bodies("drift")
    assert (drift["cause"], drift["energy_reset"]) == ("gpu-lost", False)
    assert rig.gpu.requested_mw == 400_000
    rig.clock.advance(1)
    rig.gpu.requested_mw = 600_000  # a later drift is judged afresh
    rig.monitor.tick()
    assert [d["cause"] for d in rig.bodies("drift")] == ["gpu-lost", "out-of-band"]
