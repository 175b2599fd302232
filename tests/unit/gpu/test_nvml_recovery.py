"""NvmlBackend's recovery from a lost GPU or driver: when it initialises NVML again.

Against the in-process pynvml stand-in with a ManualClock, so the re-init
interval is checked to the nanosecond (the fake-NVML driver tests check the
same recovery through real ctypes, where a lost GPU's old handles stay lost).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import GpuLost
from spark_slurm.gpu.nvml import NvmlBackend
from tests.unit.gpu import fake_nvml as fn
from tests.unit.gpu.fake_nvml import FakeNvml, h100_node


@pytest.fixture
def nvml() -> Iterator[FakeNvml]:
    fake = h100_node(2)
    yield fake
    fake.release.set()


def _lose(fake: FakeNvml) -> None:
    """The GPUs are gone: their calls fail, and enumeration finds none of them."""
    fake.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    fake.fail["nvmlDeviceGetHandleByIndex"] = fn.NVML_ERROR_GPU_IS_LOST


def test_nvml_is_initialised_again_at_most_once_per_interval(nvml: FakeNvml) -> None:
    clock = ManualClock()
    clock.advance(100)
    gpu = NvmlBackend(nvml=nvml, clock=clock)  # sparkd's interval: the default, 10 s
    _lose(nvml)
    with pytest.raises(GpuLost, match="GPU 0: NVML sample"):
        gpu.sample(0)
    assert nvml.initialised == 1  # the call that finds the loss does not re-initialise
    with pytest.raises(GpuLost):
        gpu.sample(0)  # the next call tries at once: still gone
    assert (nvml.initialised, nvml.shutdowns, gpu.reinits) == (2, 1, 1)
    clock.advance(9.999_999_999)
    with pytest.raises(GpuLost):
        gpu.sample(0)
    assert nvml.initialised == 2  # 1 ns short of the interval: no new try
    clock.advance(0.000_000_001)
    with pytest.raises(GpuLost):
        gpu.sample(1)
    assert (nvml.initialised, gpu.reinits) == (3, 2)  # exactly the interval: tried again
    nvml.fail.clear()  # the GPUs come back
    clock.advance(10)
    assert gpu.sample(0).power_mw == 450_000
    assert (nvml.initialised, gpu.reinits) == (4, 3)
    clock.advance(3600)
    gpu.sample(0)
    gpu.limits(1)
    assert (nvml.initialised, gpu.reinits) == (4, 3)  # recovered: no more re-inits
    gpu.close()


def test_a_lost_gpu_that_never_returns_leaves_the_others_governed(nvml: FakeNvml) -> None:
    gpu = NvmlBackend(nvml=nvml, reinit_interval_s=0.0)
    gone = nvml.devices.pop(1)
    nvml.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuLost):
        gpu.sample(1)
    del nvml.fail["nvmlDeviceGetPowerUsage"]
    assert gpu.sample(0).power_mw == 450_000  # re-initialised: GPU 0 is found again
    assert gpu.sample(0).power_mw == 450_000
    assert gpu.reinits == 2  # GPU 1 is still missing, so each call tries again
    assert [d.uuid for d in gpu.devices()] == ["GPU-fake-0", gone.uuid]
    gpu.close()


def test_a_driver_already_shut_down_is_initialised_again(nvml: FakeNvml) -> None:
    gpu = NvmlBackend(nvml=nvml, reinit_interval_s=0.0)
    nvml.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(GpuLost):
        gpu.sample(0)
    # The driver went away under NVML: nvmlShutdown itself now fails.
    nvml.fail = {"nvmlShutdown": fn.NVML_ERROR_UNINITIALIZED}
    assert gpu.sample(0).power_mw == 450_000
    assert (nvml.initialised, gpu.reinits) == (2, 1)
    nvml.fail.clear()
    gpu.close()


def test_a_re_initialisation_that_hangs_is_abandoned_and_tried_again(nvml: FakeNvml) -> None:
    gpu = NvmlBackend(nvml=nvml, call_timeout_s=0.3, reinit_interval_s=0.0)
    nvml.fail["nvmlDeviceGetPowerUsage"] = fn.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuLost):
        gpu.sample(0)
    del nvml.fail["nvmlDeviceGetPowerUsage"]
    nvml.hang.add("nvmlInit")
    # A safety valve only: the backend gives up on the hung nvmlInit after 0.3 s; one
    # that waited for it would see it return after 5 s and sample successfully.
    valve = threading.Timer(5.0, nvml.release.set)
    valve.start()
    try:
        with pytest.raises(GpuLost):
            gpu.sample(0)  # NVML is shut down and its init never returned
        assert gpu.reinits == 0
    finally:
        nvml.release.set()
        valve.cancel()
    nvml.hang.clear()
    deadline = time.monotonic() + 10  # the abandoned nvmlInit returns now
    while nvml.initialised < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gpu.sample(0).power_mw == 450_000
    assert gpu.reinits == 1
    gpu.close()


def test_a_hung_call_is_given_up_after_five_seconds_by_default(nvml: FakeNvml) -> None:
    """sparkd opens the backend with the defaults: 5 s bounds every NVML call."""
    gpu = NvmlBackend(nvml=nvml)
    nvml.hang.add("nvmlDeviceGetTemperature")
    with pytest.raises(GpuLost, match=r"^GPU 1: NVML sample did not return within 5 s$"):
        gpu.sample(1)
    nvml.release.set()


def test_after_four_hung_calls_the_backend_fails_at_once(nvml: FakeNvml) -> None:
    """A wedged driver: sparkd's backend stops adding threads after four stuck calls."""
    gpu = NvmlBackend(nvml=nvml, call_timeout_s=0.05)
    nvml.hang.add("nvmlDeviceGetTemperature")
    for _ in range(4):
        with pytest.raises(GpuLost, match=r"did not return within 0\.05 s"):
            gpu.sample(0)
    calls = len(nvml.calls)
    with pytest.raises(GpuLost) as err:
        gpu.limits(1)
    assert str(err.value) == "GPU 1: NVML is wedged: 4 calls never returned"
    assert len(nvml.calls) == calls  # not even tried
    nvml.release.set()
