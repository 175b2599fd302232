"""NvmlBackend through the real pynvml ctypes path, against the fake libnvidia-ml.so.1.

Each test sets the fake driver up (MIG, lost GPUs, injected return codes), then
checks what the backend makes of it and, through the driver's own state, what
it did to the hardware.
"""

from __future__ import annotations

import time

import pytest

from spark_slurm.errors import (
    GpuError,
    GpuInvalidArgument,
    GpuLost,
    GpuNoPermission,
    GpuNotSupported,
)
from spark_slurm.gpu.mapping import GresDevice, slurm_device_map
from tests.conftest import FakeNvmlFactory
from tests.unit.gpu import fakenvml as fk
from tests.unit.gpu.fakenvml import FakeGpu, h100s


def _mig_node() -> list[FakeGpu]:
    """GPU minor 0 in MIG mode with two slices, GPU minor 1 whole."""
    return [FakeGpu(minor=0, bus=0x18, mig=1, mig_slices=2), FakeGpu(minor=1, bus=0x28, mig=0)]


def test_mig_slices_are_distinct_devices_on_their_parent(fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(_mig_node())
    devs = gpu.devices()
    parent = node.get("gpu0.uuid")
    assert [(d.index, d.minor, d.mig_parent) for d in devs] == [
        (0, 0, None), (1, 1, None), (2, 0, parent), (3, 0, parent)]
    assert devs[2].uuid != devs[3].uuid and devs[2].uuid.startswith("MIG-")
    assert devs[0].name == devs[1].name == "NVIDIA H100 80GB HBM3"
    assert devs[2].name == "NVIDIA H100 80GB HBM3 MIG 1g.10gb"  # each handle's own name
    assert node.calls("nvmlDeviceGetDeviceHandleFromMigDeviceHandle") == 2
    # Slurm numbers whole GPUs by minor and the slices after them: none collide.
    mapping, missing = slurm_device_map(devs)
    assert mapping == {0: 0, 1: 1, 2: 2, 3: 3} and missing == []
    assert gpu.limits(2) == gpu.limits(0)  # a slice reads its parent's power state
    with pytest.raises(GpuNotSupported) as err:
        gpu.set_power_limit(2, 300_000)
    assert str(err.value) == (f"GPU 2: is a MIG slice; its power limit belongs to parent "
                              f"{parent}, shared by every tenant")
    assert node.gpu(0, "requested_mw") == 700_000
    assert node.calls("nvmlDeviceSetPowerManagementLimit") == 0


def test_gres_conf_mig_lines_name_slices_in_order(fake_nvml: FakeNvmlFactory) -> None:
    _, gpu = fake_nvml(_mig_node())
    gres = [GresDevice(1), GresDevice(0, mig=True), GresDevice(0, mig=True),
            GresDevice(0, mig=True), GresDevice(7)]
    mapping, missing = slurm_device_map(gpu.devices(), gres)
    # Slurm 0 is minor 1; 1 and 2 the slices; minor 0 itself (their parent) comes after.
    assert mapping == {0: 1, 1: 2, 2: 3, 5: 0}
    assert missing == ["Slurm GPU 3 (MIG slice 2 of /dev/nvidia0): no such MIG device",
                       "Slurm GPU 4 (/dev/nvidia7): no such device"]


def test_a_mig_enabled_gpu_samples_without_utilisation(fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(_mig_node())
    for index in (0, 2, 3):  # the MIG-enabled parent and its slices
        s = gpu.sample(index)
        assert s.util_pct is None
        assert s.power_mw == 450_000 and s.temp_mc == 45_000 and s.enforced_mw == 700_000
    assert gpu.sample(1).util_pct == 60
    assert node.calls("nvmlDeviceGetUtilizationRates") == 4  # asked, answered NOT_SUPPORTED


@pytest.mark.parametrize(("code", "why"), [(fk.NO_PERMISSION, "GpuNoPermission"),
                                           (fk.GPU_IS_LOST, "GpuLost")])
def test_one_bad_gpu_does_not_fail_enumeration(fake_nvml: FakeNvmlFactory, code: int,
                                               why: str) -> None:
    gpus = h100s(0, 1, 2)
    gpus[1].extra["handle_error"] = code
    node, gpu = fake_nvml(gpus)
    assert [d.minor for d in gpu.devices()] == [0, 2]
    (left_out,) = gpu.attr("unavailable")
    assert left_out[0] == 1 and left_out[1].startswith(why)
    gpu.set_power_limit(1, 400_000)  # backend 1 is NVML 2 (minor 2): it still works
    assert node.gpu(2, "requested_mw") == 400_000 and node.gpu(1, "requested_mw") == 700_000


def test_a_lost_gpu_fails_only_its_calls_and_nvml_is_initialised_again(
        fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(h100s(0, 1))
    node.set_gpu(1, lost=1)
    with pytest.raises(GpuLost, match="GPU is lost") as err:
        gpu.sample(1)
    assert err.value.index == 1
    with pytest.raises(GpuLost) as err:
        gpu.limits(1)
    assert str(err.value) == "GPU 1: NVML power limits: GPU is lost"
    assert gpu.sample(0).power_mw == 450_000  # the other GPU is untouched
    # The GPU comes back (a reset): handles taken before stay lost, exactly as a real
    # driver's do; only a fresh nvmlInit and enumeration reach it again.
    node.set_gpu(1, lost=0, epoch=1)
    assert gpu.sample(1).power_mw == 450_000
    assert gpu.attr("reinits") >= 1
    assert node.calls("nvmlShutdown") >= 1 and node.calls("nvmlInitWithFlags") >= 2
    gpu.set_power_limit(1, 500_000)
    assert node.gpu(1, "requested_mw") == 500_000


def test_a_gpu_still_lost_stays_lost_without_spinning(fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(h100s(0, 1), reinit_interval_s=3600.0)
    node.set_gpu(1, lost=1)
    for _ in range(3):
        with pytest.raises(GpuLost):
            gpu.sample(1)
    assert node.calls("nvmlInitWithFlags") == 2  # start, and one try; then the interval
    node.set_gpu(1, lost=0, epoch=1)
    with pytest.raises(GpuLost):  # the stale handle, and no re-init before the interval
        gpu.sample(1)


@pytest.mark.parametrize(("code", "error"), [
    (fk.NO_PERMISSION, GpuNoPermission), (fk.INVALID_ARGUMENT, GpuInvalidArgument),
    (fk.NOT_SUPPORTED, GpuNotSupported), (fk.GPU_IS_LOST, GpuLost),
    (fk.UNINITIALIZED, GpuLost), (fk.UNKNOWN, GpuLost)])
def test_driver_return_codes_become_typed_errors(fake_nvml: FakeNvmlFactory, code: int,
                                                 error: type[GpuError]) -> None:
    node, gpu = fake_nvml(h100s(0))
    node.set(fail__nvmlDeviceSetPowerManagementLimit=code)
    with pytest.raises(error) as err:
        gpu.set_power_limit(0, 500_000)
    assert type(err.value) is error and err.value.index == 0
    assert str(err.value).startswith("GPU 0: NVML set power limit: ")
    assert node.gpu(0, "requested_mw") == 700_000


def test_without_a_loaded_driver_the_backend_is_gpu_lost(fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(h100s(0))
    gpu.close()
    node.set(driver=0)
    with pytest.raises(GpuLost, match="Driver Not Loaded"):
        fake_nvml([], state=node.path)


def test_units_and_the_energy_counter(fake_nvml: FakeNvmlFactory) -> None:
    gpus = h100s(0)
    gpus[0].temp_c = 83
    node, gpu = fake_nvml(gpus)
    first = gpu.sample(0)
    time.sleep(0.3)
    second = gpu.sample(0)
    assert first.temp_mc == 83_000  # NVML's whole degrees C, as millidegrees
    assert first.power_mw == 450_000  # mW
    elapsed_s = (second.time_ns - first.time_ns) / 1e9
    # mJ: 450 W for `elapsed` seconds, give or take the time between the two calls.
    assert second.energy_mj - first.energy_mj == pytest.approx(450_000 * elapsed_s, rel=0.25)
    node.set_gpu(0, energy_mj=0)  # the driver reloaded: the counter restarts
    third = gpu.sample(0)
    assert third.energy_epoch == first.energy_epoch + 1


def test_driver_rounding_and_a_lower_limiter_show_in_the_limits(
        fake_nvml: FakeNvmlFactory) -> None:
    gpus = h100s(0, 1)
    gpus[0].extra["round_mw"] = 1000
    gpus[1].extra["other_limit_mw"] = 300_000
    _, gpu = fake_nvml(gpus)
    gpu.set_power_limit(0, 333_333)
    assert gpu.limits(0).requested_mw == gpu.limits(0).enforced_mw == 333_000
    gpu.set_power_limit(1, 500_000)
    lim = gpu.limits(1)
    assert (lim.requested_mw, lim.enforced_mw) == (500_000, 300_000)
    assert gpu.sample(1).power_mw == 300_000  # the lower limiter holds the draw


def test_persistence_mode_is_read_and_set(fake_nvml: FakeNvmlFactory) -> None:
    gpus = h100s(0)
    gpus[0].persistence = 0
    node, gpu = fake_nvml(gpus)
    assert gpu.persistence_mode(0) is False
    gpu.set_persistence_mode(0, True)
    assert node.gpu(0, "persistence") == 1 and gpu.persistence_mode(0) is True


def test_a_wedged_call_times_out_and_later_calls_work(fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(h100s(0), call_timeout_s=0.3)
    node.set(delay_ms__nvmlDeviceGetTemperature=2000)
    with pytest.raises(GpuLost, match=r"did not return within 0\.3 s"):
        gpu.sample(0)
    node.set(delay_ms__nvmlDeviceGetTemperature=0)
    time.sleep(2)  # the stuck call returns; its worker exits
    assert gpu.limits(0).enforced_mw == 700_000


@pytest.mark.parametrize("code", [fk.NOT_SUPPORTED, fk.FUNCTION_NOT_FOUND])
def test_a_driver_without_clock_event_reasons_falls_back_to_throttle_reasons(
        fake_nvml: FakeNvmlFactory, code: int) -> None:
    gpus = h100s(0)
    gpus[0].reasons = 0x24
    node, gpu = fake_nvml(gpus)
    assert gpu.sample(0).reasons == 0x24
    assert node.calls("nvmlDeviceGetCurrentClocksThrottleReasons") == 0  # the new name first
    node.set(fail__nvmlDeviceGetCurrentClocksEventReasons=code)  # an older driver
    assert gpu.sample(0).reasons == 0x24
    assert node.calls("nvmlDeviceGetCurrentClocksThrottleReasons") == 1


@pytest.mark.parametrize(("code", "error"), [(fk.GPU_IS_LOST, GpuLost),
                                             (fk.NO_PERMISSION, GpuNoPermission)])
def test_any_other_clock_reasons_failure_fails_the_sample(
        fake_nvml: FakeNvmlFactory, code: int, error: type[GpuError]) -> None:
    node, gpu = fake_nvml(h100s(0))
    node.set(fail__nvmlDeviceGetCurrentClocksEventReasons=code)
    with pytest.raises(error) as err:
        gpu.sample(0)
    assert type(err.value) is error and err.value.index == 0
    assert str(err.value).startswith("GPU 0: NVML sample: ")
    assert node.calls("nvmlDeviceGetCurrentClocksThrottleReasons") == 0  # no guess


def test_persistence_mode_is_switched_both_ways_on_the_parent_of_a_slice(
        fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(_mig_node())
    assert gpu.persistence_mode(2) is True  # slice 0 of GPU 0: its parent's mode
    gpu.set_persistence_mode(0, False)
    assert node.gpu(0, "persistence") == 0
    assert gpu.persistence_mode(0) is False and gpu.persistence_mode(3) is False
    gpu.set_persistence_mode(3, True)  # through a slice: the parent's setting
    assert node.gpu(0, "persistence") == 1 and node.gpu(1, "persistence") == 1
    assert gpu.persistence_mode(0) is True


def test_persistence_calls_on_a_lost_gpu_name_it_and_recover_with_it(
        fake_nvml: FakeNvmlFactory) -> None:
    node, gpu = fake_nvml(h100s(0, 1))
    node.set_gpu(1, lost=1)
    with pytest.raises(GpuLost) as err:
        gpu.persistence_mode(1)
    assert str(err.value) == "GPU 1: NVML persistence mode: GPU is lost"
    node.set_gpu(1, lost=0, epoch=1)  # back after a reset: only a re-init reaches it
    assert gpu.persistence_mode(1) is True
    node.set_gpu(1, lost=1)
    with pytest.raises(GpuLost) as err:
        gpu.set_persistence_mode(1, False)
    assert str(err.value) == "GPU 1: NVML set persistence mode: GPU is lost"
    node.set_gpu(1, lost=0, epoch=2)
    gpu.set_persistence_mode(1, False)
    assert node.gpu(1, "persistence") == 0
