"""NvmlBackend against an injected fake pynvml: error typing, MIG, resets, hangs."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spark_slurm.errors import (
    GpuError,
    GpuInvalidArgument,
    GpuLost,
    GpuNoPermission,
    GpuNotFound,
    GpuNotSupported,
)
from spark_slurm.gpu import map_slurm_indices
from spark_slurm.gpu.nvml import CallGuard, NvmlBackend
from tests.unit.gpu import fake_nvml as fn
from tests.unit.gpu.fake_nvml import FakeDevice, FakeNvml, h100_node


@pytest.fixture
def nvml() -> Iterator[FakeNvml]:
    fake = h100_node(2)
    yield fake
    fake.release.set()  # let any deliberately hung call finish


@pytest.fixture
def gpu(nvml: FakeNvml) -> Iterator[NvmlBackend]:
    backend = NvmlBackend(nvml=nvml, call_timeout_s=10.0)
    yield backend
    backend.close()


def test_devices_come_from_nvml_with_minor_numbers(gpu: NvmlBackend) -> None:
    devs = gpu.devices()
    assert [(d.index, d.minor, d.pci_bus_id) for d in devs] == [
        (0, 1, "00000000:18:00.0"), (1, 0, "00000000:28:00.0")]
    assert map_slurm_indices(gpu, [0]) == [1]  # /dev/nvidia0 is NVML device 1


@pytest.mark.parametrize(("code", "error"), [
    (fn.NVML_ERROR_NO_PERMISSION, GpuNoPermission),
    (fn.NVML_ERROR_INVALID_ARGUMENT, GpuInvalidArgument),
    (fn.NVML_ERROR_NOT_SUPPORTED, GpuNotSupported),
    (fn.NVML_ERROR_NOT_FOUND, GpuNotFound),
    (fn.NVML_ERROR_GPU_IS_LOST, GpuLost),
    (fn.NVML_ERROR_UNKNOWN, GpuLost),
    (fn.NVML_ERROR_UNINITIALIZED, GpuLost),
    (fn.NVML_ERROR_DRIVER_NOT_LOADED, GpuLost),
    (12345, GpuError),
])
def test_nvml_errors_become_typed_errors(nvml: FakeNvml, gpu: NvmlBackend, code: int,
                                         error: type[GpuError]) -> None:
    nvml.fail["nvmlDeviceSetPowerManagementLimit"] = code
    with pytest.raises(error) as err:
        gpu.set_power_limit(0, 500_000)
    assert type(err.value) is error
    assert err.value.index == 0
    assert "set power limit" in str(err.value)
    assert nvml.devices[0].requested_mw == 700_000


def test_not_root_is_no_permission(nvml: FakeNvml, gpu: NvmlBackend) -> None:
    nvml.is_root = False
    with pytest.raises(GpuNoPermission):
        gpu.set_power_limit(1, 300_000)


def test_read_back_uses_the_enforced_limit(nvml: FakeNvml, gpu: NvmlBackend) -> None:
    nvml.devices[0].other_limiter_mw = 450_000  # e.g. the BMC holds a lower cap
    gpu.set_power_limit(0, 600_000)
    lim = gpu.limits(0)
    assert lim.requested_mw == 600_000
    assert lim.enforced_mw == 450_000
    assert gpu.sample(0).enforced_mw == 450_000


def test_a_gpu_lost_mid_run_fails_only_its_calls(nvml: FakeNvml, gpu: NvmlBackend) -> None:
    nvml.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuLost) as err:
        gpu.sample(0)
    assert str(err.value) == "GPU 0: NVML sample: NVML error code 15"
    assert err.value.index == 0
    del nvml.fail["nvmlDeviceGetPowerUsage"]
    assert gpu.sample(0).power_mw == 450_000


def test_init_failure_is_gpu_lost_and_nothing_is_left_open() -> None:
    fake = h100_node(1)
    fake.fail["nvmlInit"] = fn.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(GpuLost, match="init"):
        NvmlBackend(nvml=fake)
    fake2 = h100_node(1)
    fake2.fail["nvmlDeviceGetCount"] = fn.NVML_ERROR_UNKNOWN
    with pytest.raises(GpuLost, match=r"^NVML device enumeration: NVML error code 999$"):
        NvmlBackend(nvml=fake2)
    assert fake2.shutdowns == fake2.initialised == 1


def test_a_hung_call_times_out_as_gpu_lost(nvml: FakeNvml) -> None:
    gpu = NvmlBackend(nvml=nvml, call_timeout_s=0.3)
    nvml.hang.add("nvmlDeviceGetTemperature")
    with pytest.raises(GpuLost, match="did not return") as err:
        gpu.sample(0)
    assert err.value.index == 0
    nvml.hang.clear()
    assert gpu.limits(1).enforced_mw == 700_000  # a fresh worker serves later calls


def test_a_wedged_driver_fails_fast_instead_of_piling_up_threads() -> None:
    before = set(threading.enumerate())
    guard = CallGuard(max_stuck=2)
    release = threading.Event()
    for _ in range(2):
        with pytest.raises(GpuLost, match="did not return"):
            guard.call(lambda: release.wait(30), 0.05, "hang")
    with pytest.raises(GpuLost, match="wedged: 2 calls never returned"):
        guard.call(lambda: 1, 5.0, "quick")
    release.set()  # the driver comes back: the stuck calls finish, the guard recovers
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and \
            len([t for t in threading.enumerate() if t not in before]) > 1:
        time.sleep(0.01)  # until both stuck workers have returned and exited
    assert guard.stuck == 0
    assert guard.call(lambda: 7, 5.0, "quick") == 7


def test_energy_counter_reset_bumps_the_epoch(nvml: FakeNvml, gpu: NvmlBackend) -> None:
    first = gpu.sample(0)
    second = gpu.sample(0)
    assert second.energy_mj > first.energy_mj
    assert second.energy_epoch == first.energy_epoch == 0
    nvml.devices[0].energy_mj = 0  # driver reload
    third = gpu.sample(0)
    assert third.energy_mj < second.energy_mj
    assert third.energy_epoch == 1
    assert gpu.sample(1).energy_epoch == 0
    assert gpu.sample(0).energy_epoch == 1  # counting up from the restart
    nvml.devices[0].energy_mj = 0  # reloaded again: each restart counts
    assert gpu.sample(0).energy_epoch == 2
    assert gpu.sample(0).energy_epoch == 2


def test_old_bindings_fall_back_to_throttle_reasons() -> None:
    fake = h100_node(1, event_reasons=False)
    fake.reasons_mask = 0x4 | 0x20
    gpu = NvmlBackend(nvml=fake)
    assert gpu.sample(0).reasons == 0x24
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in fake.calls
    gpu.close()


def test_persistence_mode(nvml: FakeNvml, gpu: NvmlBackend) -> None:
    nvml.devices[1].persistence = 0
    assert gpu.persistence_mode(0) is True
    assert gpu.persistence_mode(1) is False
    nvml.fail["nvmlDeviceGetPersistenceMode"] = fn.NVML_ERROR_NOT_SUPPORTED
    assert gpu.persistence_mode(0) is None


def test_mig_slices_map_to_their_parent_and_refuse_limit_changes() -> None:
    parent = FakeDevice(minor=0, bus=0x18, mig_slices=["MIG-a", "MIG-b"])
    fake = FakeNvml([parent, FakeDevice(minor=1, bus=0x2A)])
    gpu = NvmlBackend(nvml=fake)
    devs = gpu.devices()
    assert [(d.uuid, d.mig_parent) for d in devs] == [
        ("GPU-fake-0", None), ("GPU-fake-1", None), ("MIG-a", "GPU-fake-0"),
        ("MIG-b", "GPU-fake-0")]
    assert gpu.limits(2) == gpu.limits(0)  # the parent's power state
    with pytest.raises(GpuNotSupported) as err:
        gpu.set_power_limit(2, 300_000)
    assert str(err.value) == ("GPU 2: is a MIG slice; its power limit belongs to parent "
                              "GPU-fake-0, shared by every tenant")
    assert err.value.index == 2
    assert parent.requested_mw == 700_000
    assert map_slurm_indices(gpu, [0, 1]) == [0, 1]  # whole GPUs, never a slice
    gpu.close()


@pytest.mark.parametrize("code", [fn.NVML_ERROR_LIBRARY_NOT_FOUND,
                                  fn.NVML_ERROR_DRIVER_NOT_LOADED])
def test_without_a_driver_nvml_is_a_clean_gpu_lost(code: int) -> None:
    """No libnvidia-ml.so.1, or no kernel driver: a typed GpuLost naming init, and
    nothing left initialised (the C fake's driver=0 covers the real ctypes path)."""
    fake = h100_node(1)
    fake.fail["nvmlInit"] = code
    with pytest.raises(GpuLost, match=r"^NVML init: NVML error code") as err:
        NvmlBackend(nvml=fake)
    assert err.value.index is None
    assert fake.initialised == 0 and fake.calls == ["nvmlInit"]


def test_close_shuts_down_once_and_later_calls_fail_cleanly(nvml: FakeNvml) -> None:
    gpu = NvmlBackend(nvml=nvml)
    gpu.close()
    gpu.close()
    assert nvml.shutdowns == 1
    with pytest.raises(GpuLost) as err:
        gpu.sample(1)
    assert str(err.value) == "GPU 1: NVML backend is closed"
    assert err.value.index == 1


def test_a_limit_outside_the_range_is_refused_before_nvml_is_asked(
        nvml: FakeNvml, gpu: NvmlBackend) -> None:
    with pytest.raises(GpuInvalidArgument) as err:
        gpu.set_power_limit(1, 199_500)
    assert str(err.value) == "GPU 1: power limit 199.5 W is outside 200-700 W"
    assert (err.value.index, err.value.value, err.value.min_mw, err.value.max_mw) == (
        1, 199_500, 200_000, 700_000)
    with pytest.raises(GpuInvalidArgument, match=r"^GPU 0: power limit 700\.001 W is outside"):
        gpu.set_power_limit(0, 700_001)
    assert "nvmlDeviceSetPowerManagementLimit" not in nvml.calls
    gpu.set_power_limit(0, 200_000)  # both ends of the range are allowed
    gpu.set_power_limit(1, 700_000)
    assert [d.requested_mw for d in nvml.devices] == [200_000, 700_000]


@pytest.mark.parametrize("index", [2, -1])
def test_an_index_past_either_end_is_not_found(gpu: NvmlBackend, index: int) -> None:
    for call in (gpu.limits, gpu.sample, gpu.persistence_mode):
        with pytest.raises(GpuNotFound) as err:
            call(index)
        assert str(err.value) == f"GPU {index}: no such GPU (NVML sees 2 devices)"
        assert err.value.index == index


def test_a_failed_shutdown_is_reported_and_the_backend_is_closed(nvml: FakeNvml) -> None:
    gpu = NvmlBackend(nvml=nvml)
    nvml.fail["nvmlShutdown"] = fn.NVML_ERROR_UNKNOWN
    with pytest.raises(GpuLost) as err:
        gpu.close()
    assert str(err.value) == "NVML shutdown: NVML error code 999"
    assert err.value.index is None
    gpu.close()  # closed all the same: not asked again
    assert nvml.calls.count("nvmlShutdown") == 1
    with pytest.raises(GpuLost, match="closed"):
        gpu.limits(0)


def test_without_the_nvml_bindings_the_backend_is_gpu_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    with pytest.raises(GpuLost, match=r"^NVML bindings unavailable: import of pynvml"):
        NvmlBackend()


def test_a_mig_slice_nvml_refuses_is_left_out_and_named() -> None:
    parent = FakeDevice(minor=0, bus=0x18, mig_slices=["MIG-a", "MIG-b"])
    fake = FakeNvml([parent])
    parent_of = fake.nvmlDeviceGetDeviceHandleFromMigDeviceHandle

    def refuse_a(h: Any) -> Any:
        if h == "MIG-a":
            raise fn.NVMLError(fn.NVML_ERROR_NO_PERMISSION)
        return parent_of(h)

    fake.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = refuse_a  # type: ignore[method-assign]
    gpu = NvmlBackend(nvml=fake)
    assert [(d.index, d.uuid) for d in gpu.devices()] == [(0, "GPU-fake-0"), (1, "MIG-b")]
    assert gpu.unavailable == [(0, "MIG slice: GpuNoPermission: NVML error code 4")]
    assert gpu.devices()[1].pci_bus_id == gpu.devices()[0].pci_bus_id  # the parent's
    gpu.close()


def test_call_threads_are_daemons_so_a_hung_driver_cannot_block_exit() -> None:
    """sparkd must still exit with an NVML call stuck in the driver forever."""
    before = set(threading.enumerate())
    guard = CallGuard()
    release = threading.Event()
    with pytest.raises(GpuLost, match="did not return"):
        guard.call(lambda: release.wait(30), 0.05, "hang")
    started = [t for t in threading.enumerate() if t not in before]
    assert len(started) == 2  # the stuck one and its replacement
    assert all(t.daemon for t in started)
    release.set()


def test_mig_slices_after_an_empty_slot_are_found() -> None:
    """Deleting a GPU instance leaves its slot empty; the slices after it still count."""
    parent = FakeDevice(minor=0, bus=0x18, mig_slices=[None, "MIG-b", None, "MIG-d"])
    gpu = NvmlBackend(nvml=FakeNvml([parent]))
    assert [(d.index, d.uuid) for d in gpu.devices()] == [
        (0, "GPU-fake-0"), (1, "MIG-b"), (2, "MIG-d")]
    assert gpu.unavailable == []
    gpu.close()


def test_a_failed_enumeration_is_reported_even_when_its_shutdown_fails() -> None:
    fake = h100_node(1)
    fake.fail["nvmlDeviceGetCount"] = fn.NVML_ERROR_UNKNOWN
    fake.fail["nvmlShutdown"] = fn.NVML_ERROR_UNINITIALIZED
    with pytest.raises(GpuLost, match=r"^NVML device enumeration: NVML error code 999$"):
        NvmlBackend(nvml=fake)
    assert fake.calls == ["nvmlInit", "nvmlDeviceGetCount", "nvmlShutdown"]
