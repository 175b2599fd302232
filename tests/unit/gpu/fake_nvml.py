"""A stand-in for the `pynvml` module: same function names, NVMLError with codes.

Injected into NvmlBackend (dependency injection, no monkeypatching) so error
mapping, MIG handling, energy resets and timeouts are tested without a GPU.
Limits behave like the driver's: the enforced limit is the lowest of every
limiter, so another limiter (`other_limiter_mw`) makes read-back differ.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error code {value}")
        self.value = value


@dataclass
class FakeDevice:
    minor: int
    bus: int
    min_mw: int = 200_000
    max_mw: int = 700_000
    default_mw: int = 700_000
    requested_mw: int = 700_000
    other_limiter_mw: int | None = None
    demand_mw: int = 450_000
    energy_mj: int = 0
    temp_c: int = 45
    util: int = 60
    persistence: int = 1
    mig_slices: list[str | None] = field(default_factory=list)  # None: an empty slot
    parent: FakeDevice | None = None
    uuid: str = ""

    @property
    def enforced_mw(self) -> int:
        limits = [self.requested_mw]
        if self.other_limiter_mw is not None:
            limits.append(self.other_limiter_mw)
        return min(limits)


@dataclass
class _Pci:
    busId: bytes  # the pynvml field name


@dataclass
class _Util:
    gpu: int
    memory: int


class FakeNvml:
    """The module object handed to NvmlBackend(nvml=...)."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_FEATURE_DISABLED = 0
    NVML_FEATURE_ENABLED = 1
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, devices: list[FakeDevice], *, event_reasons: bool = True,
                 is_root: bool = True) -> None:
        self.devices = devices
        for i, d in enumerate(devices):
            d.uuid = d.uuid or f"GPU-fake-{i}"
        self.slices: dict[str, FakeDevice] = {}
        for d in devices:
            for s in d.mig_slices:
                if s is not None:
                    self.slices[s] = d
        self.fail: dict[str, int] = {}  # function name -> NVML error code it raises
        self.hang: set[str] = set()  # function names that block until `release` is set
        self.release = threading.Event()
        self.initialised = 0
        self.shutdowns = 0
        self.calls: list[str] = []
        self.is_root = is_root
        self.reasons_mask = 0x4
        if event_reasons:  # older bindings have only the ...ThrottleReasons name
            self.nvmlDeviceGetCurrentClocksEventReasons = self._wrap(
                "nvmlDeviceGetCurrentClocksEventReasons", lambda h: self.reasons_mask)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML_ERROR_") and name in globals():
            return globals()[name]
        raise AttributeError(name)

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.hang:
            self.release.wait(30)
        if name in self.fail:
            raise NVMLError(self.fail[name])
        if name != "nvmlInit" and self.initialised <= self.shutdowns:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _wrap(self, name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            self._enter(name)
            return fn(*args)
        return call

    def _dev(self, h: Any) -> FakeDevice:
        if isinstance(h, str):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # power calls on a MIG slice handle
        assert isinstance(h, FakeDevice)
        return h

    # --- the pynvml functions NvmlBackend uses -------------------------------
    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= i < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.devices[i]

    def nvmlDeviceGetMinorNumber(self, h: FakeDevice) -> int:
        self._enter("nvmlDeviceGetMinorNumber")
        return h.minor

    def nvmlDeviceGetPciInfo(self, h: FakeDevice) -> _Pci:
        self._enter("nvmlDeviceGetPciInfo")
        return _Pci(f"00000000:{h.bus:02X}:00.0".encode())

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        self._enter("nvmlDeviceGetUUID")
        return h if isinstance(h, str) else h.uuid

    def nvmlDeviceGetName(self, h: Any) -> str:
        self._enter("nvmlDeviceGetName")
        return "NVIDIA H100 MIG 1g.10gb" if isinstance(h, str) else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMigMode(self, h: FakeDevice) -> tuple[int, int]:
        self._enter("nvmlDeviceGetMigMode")
        mode = 1 if h.mig_slices else 0
        return mode, mode

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeDevice) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeDevice, j: int) -> str:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        slot = h.mig_slices[j] if j < len(h.mig_slices) else None
        if slot is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return slot

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: Any) -> FakeDevice:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        if not isinstance(h, str):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.slices[h]

    def nvmlDeviceIsMigDeviceHandle(self, h: Any) -> int:
        self._enter("nvmlDeviceIsMigDeviceHandle")
        return int(isinstance(h, str))

    def nvmlDeviceSetPersistenceMode(self, h: Any, mode: int) -> None:
        self._enter("nvmlDeviceSetPersistenceMode")
        if not self.is_root:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        self._dev(h).persistence = mode

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: Any) -> tuple[int, int]:
        self._enter("nvmlDeviceGetPowerManagementLimitConstraints")
        d = self._dev(h)
        return d.min_mw, d.max_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: Any) -> int:
        self._enter("nvmlDeviceGetPowerManagementDefaultLimit")
        return self._dev(h).default_mw

    def nvmlDeviceGetPowerManagementLimit(self, h: Any) -> int:
        self._enter("nvmlDeviceGetPowerManagementLimit")
        return self._dev(h).requested_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit")
        return self._dev(h).enforced_mw

    def nvmlDeviceSetPowerManagementLimit(self, h: Any, mw: int) -> None:
        self._enter("nvmlDeviceSetPowerManagementLimit")
        d = self._dev(h)
        if not self.is_root:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        if not d.min_mw <= mw <= d.max_mw:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        d.requested_mw = mw

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        d = self._dev(h)
        return min(d.demand_mw, d.enforced_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption")
        d = self._dev(h)
        d.energy_mj += min(d.demand_mw, d.enforced_mw) // 10  # 100 ms between readings
        return d.energy_mj

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature")
        return self._dev(h).temp_c

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> _Util:
        self._enter("nvmlDeviceGetUtilizationRates")
        return _Util(self._dev(h).util, 10)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: Any) -> int:
        self._enter("nvmlDeviceGetCurrentClocksThrottleReasons")
        return self.reasons_mask

    def nvmlDeviceGetPersistenceMode(self, h: Any) -> int:
        self._enter("nvmlDeviceGetPersistenceMode")
        return self._dev(h).persistence


def h100_node(n: int = 2, **kw: Any) -> FakeNvml:
    """n fake H100s whose minors run backwards (NVML order != minor order)."""
    return FakeNvml([FakeDevice(minor=n - 1 - i, bus=0x18 + 0x10 * i) for i in range(n)], **kw)
