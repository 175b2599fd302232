"""One monitor pass: each reading reaches sparkd's metrics, and a validate-only GPU
is only watched (its changes attributed), never throttled or reconciled. (A lost GPU
not hiding the others is in test_nvml_actuation, whose C fake loses one at a time.)
"""

from __future__ import annotations

from pathlib import Path

from spark_slurm.daemon.automations import Monitor
from spark_slurm.daemon.config import ExecutorSettings
from spark_slurm.daemon.executor_intents import PendingIntents
from spark_slurm.daemon.executors import ExecutorGate
from spark_slurm.gpu.backend import Sample
from tests.unit.daemon.test_monitor_causes import Rig, rigged
from tests.unit.daemon.test_monitor_thermal import GUARD
from tests.unit.gpu import fake_nvml as fn


def test_each_reading_is_handed_to_the_metrics(tmp_path: Path) -> None:
    with rigged(tmp_path) as rig:
        seen: list[tuple[int, Sample]] = []
        monitor = Monitor(rig.monitor.pipeline, rig.monitor.policy,
                          on_sample=lambda gpu, s: seen.append((gpu, s)))
        rig.gpu.temp_c = 61
        monitor.tick()
        assert [g for g, _ in seen] == [0, 1]
        assert seen[0][1].temp_mc == 61_000 and seen[0][1].enforced_mw == 400_000
        assert seen[1][1].enforced_mw == rig.fake.devices[0].requested_mw


def _validate_only(rig: Rig, tmp_path: Path) -> Monitor:
    """A monitor for a node whose GPU 0 an external executor sets (sparkd validates)."""
    (tmp_path / "executors").mkdir()
    pipeline = rig.monitor.pipeline
    gate = ExecutorGate(pipeline, ExecutorSettings(validate_gpus=(0,)),
                        PendingIntents(tmp_path / "executors"), clock=rig.clock)
    pipeline.executors = gate
    monitor = Monitor(pipeline, rig.monitor.policy, executors=gate)
    monitor.tick()  # its first reading
    return monitor


def test_a_validate_only_gpu_is_watched_and_never_set(tmp_path: Path) -> None:
    with rigged(tmp_path, GUARD) as rig:
        monitor = _validate_only(rig, tmp_path)
        rig.gpu.temp_c = 95  # hot, and set by the external executor without an intent
        rig.gpu.requested_mw = 650_000
        rig.clock.advance(1)
        monitor.tick()
        assert rig.bodies("throttle") == [] and rig.bodies("drift") == []
        assert rig.gpu.requested_mw == 650_000
        (executor,) = rig.bodies("executor")
        assert (executor["verdict"], executor["cause"], executor["energy_reset"]) == (
            "applied-without-intent", "out-of-band", False)
        assert executor["gpus"][0]["readback_mw"] == 650_000


def test_a_validate_only_gpu_back_from_an_outage_is_judged_gpu_lost(tmp_path: Path) -> None:
    with rigged(tmp_path) as rig:
        monitor = _validate_only(rig, tmp_path)
        rig.fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
        monitor.tick()
        del rig.fake.fail["nvmlDeviceGetPowerUsage"]
        rig.clock.advance(5)
        rig.gpu.requested_mw = 650_000
        monitor.tick()
        (executor,) = rig.bodies("executor")
        assert (executor["cause"], executor["energy_reset"]) == ("gpu-lost", False)
        assert rig.gpu.requested_mw == 650_000


def test_a_validate_only_gpu_s_driver_reload_is_named(tmp_path: Path) -> None:
    with rigged(tmp_path) as rig:
        monitor = _validate_only(rig, tmp_path)
        rig.gpu.requested_mw = rig.gpu.default_mw
        rig.gpu.energy_mj = 0
        rig.clock.advance(1)
        monitor.tick()
        (executor,) = rig.bodies("executor")
        assert (executor["cause"], executor["energy_reset"]) == ("driver-reload", True)
