"""The NVML backend (nvidia-ml-py, `import pynvml`), with every error typed.

Facts it follows (see docs and nvml-facts): read-back uses the *enforced* limit,
not the requested one; the energy counter restarts when the driver reloads, so
each decrease bumps `Sample.energy_epoch`; a MIG slice's power belongs to its
parent GPU, so slices report the parent's readings and refuse limit changes.

A wedged driver can block an NVML call indefinitely, so every batch of calls
runs on a worker thread and the caller waits at most `call_timeout_s`; on a
timeout the stuck worker is abandoned (it is a daemon thread) and the call fails
as GpuLost. The pynvml module itself is injectable, so the mapping logic is
tested without a GPU against a fake module with the same names.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import (
    GpuError,
    GpuInvalidArgument,
    GpuLost,
    GpuNoPermission,
    GpuNotFound,
    GpuNotSupported,
)
from spark_slurm.gpu.backend import DeviceInfo, PowerLimits, Sample

T = TypeVar("T")

# NVML return codes -> typed errors; resolved by name so a fake module works too.
_ERROR_MAP: tuple[tuple[str, type[GpuError]], ...] = (
    ("NVML_ERROR_NO_PERMISSION", GpuNoPermission),
    ("NVML_ERROR_INVALID_ARGUMENT", GpuInvalidArgument),
    ("NVML_ERROR_NOT_SUPPORTED", GpuNotSupported),
    ("NVML_ERROR_FUNCTION_NOT_FOUND", GpuNotSupported),
    ("NVML_ERROR_NOT_FOUND", GpuNotFound),
    ("NVML_ERROR_GPU_IS_LOST", GpuLost),
    ("NVML_ERROR_UNKNOWN", GpuLost),
    ("NVML_ERROR_UNINITIALIZED", GpuLost),
    ("NVML_ERROR_DRIVER_NOT_LOADED", GpuLost),
    ("NVML_ERROR_LIBRARY_NOT_FOUND", GpuLost),
    ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", GpuLost),
    ("NVML_ERROR_TIMEOUT", GpuLost),
    ("NVML_ERROR_RESET_REQUIRED", GpuLost),
)


class _Job:
    """One call handed to the worker; `abandoned` once its caller stopped waiting."""

    __slots__ = ("abandoned", "done", "error", "fn", "value")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.abandoned = False


class CallGuard:
    """Runs callables on a daemon worker thread so a hung driver call cannot hang us.

    A call that outlives its timeout is abandoned with its thread (a fresh worker
    serves later calls; the old one exits if the call ever returns). Once
    `max_stuck` calls are stuck at once, calls fail at once instead of piling up
    threads on a wedged driver.
    """

    def __init__(self, max_stuck: int = 4) -> None:
        self._call_lock = threading.Lock()  # one call at a time: NVML work is serial
        self._state_lock = threading.Lock()  # guards `stuck` and each job's flags
        self._max_stuck = max_stuck
        self.stuck = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._start()

    def _start(self) -> None:
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._loop, args=(self._jobs,), name="nvml-call",
                         daemon=True).start()

    def _loop(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                job.value = job.fn()
            except BaseException as exc:  # handed back to the caller's thread
                job.error = exc
            with self._state_lock:
                job.done.set()
                if job.abandoned:
                    self.stuck -= 1

    def call(self, fn: Callable[[], T], timeout_s: float, what: str) -> T:
        with self._call_lock:
            if self.stuck >= self._max_stuck:
                raise GpuLost(f"NVML is wedged: {self.stuck} calls never returned")
            job = _Job(fn)
            self._jobs.put(job)
            if not job.done.wait(timeout_s):
                with self._state_lock:
                    if not job.done.is_set():
                        job.abandoned = True
                        self.stuck += 1
                        self._jobs.put(None)  # the old worker exits if it ever returns
                        self._start()
                if job.abandoned:
                    raise GpuLost(f"NVML {what} did not return within {timeout_s:g} s")
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class _Handle:
    info: DeviceInfo
    handle: Any
    power_handle: Any  # the parent GPU's handle for a MIG slice, else `handle`


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """GpuBackend over NVML. `nvml` is the pynvml module (injected in tests)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK, nvml: Any = None,
                 call_timeout_s: float = 5.0) -> None:
        if nvml is None:
            try:
                import pynvml  # noqa: PLC0415 (lazy: only NVML nodes need it)
            except ImportError as exc:
                raise GpuLost(f"NVML bindings unavailable: {exc}") from None
            nvml = pynvml
        self._nvml = nvml
        self._clock = clock
        self._timeout = call_timeout_s
        self._worker = CallGuard()
        self._codes = {getattr(nvml, name): cls for name, cls in _ERROR_MAP
                       if hasattr(nvml, name)}
        self._energy: dict[int, tuple[int, int]] = {}  # index -> (last mJ, epoch)
        self._closed = False
        self._call(None, "init", nvml.nvmlInit)
        try:
            self._handles = self._call(None, "device enumeration", self._enumerate)
        except GpuError:
            self._call(None, "shutdown", nvml.nvmlShutdown)
            raise

    def _call(self, index: int | None, what: str, fn: Callable[[], T]) -> T:
        """Run fn on the worker with the timeout, mapping NVMLError to typed errors."""
        if self._closed:
            raise GpuLost("NVML backend is closed", index)
        try:
            return self._worker.call(fn, self._timeout, what)
        except GpuLost as exc:
            if exc.index is None and index is not None:
                raise GpuLost(exc.message, index) from None
            raise
        except self._nvml.NVMLError as exc:
            cls = self._codes.get(getattr(exc, "value", None), GpuError)
            raise cls(f"NVML {what}: {exc}", index) from None

    def _enumerate(self) -> list[_Handle]:
        n = self._nvml
        out: list[_Handle] = []
        physical = []
        for i in range(n.nvmlDeviceGetCount()):
            h = n.nvmlDeviceGetHandleByIndex(i)
            info = DeviceInfo(
                index=i, minor=n.nvmlDeviceGetMinorNumber(h),
                pci_bus_id=_text(n.nvmlDeviceGetPciInfo(h).busId),
                uuid=_text(n.nvmlDeviceGetUUID(h)), name=_text(n.nvmlDeviceGetName(h)))
            out.append(_Handle(info, h, h))
            physical.append((info, h))
        for parent, h in physical:
            for mig in self._mig_slices(h):
                info = DeviceInfo(index=len(out), minor=parent.minor,
                                  pci_bus_id=parent.pci_bus_id,
                                  uuid=_text(n.nvmlDeviceGetUUID(mig)),
                                  name=_text(n.nvmlDeviceGetName(mig)), mig_parent=parent.uuid)
                out.append(_Handle(info, mig, h))
        return out

    def _mig_slices(self, h: Any) -> list[Any]:
        n = self._nvml
        try:
            current, _pending = n.nvmlDeviceGetMigMode(h)
        except n.NVMLError:
            return []  # not MIG-capable
        if current != getattr(n, "NVML_DEVICE_MIG_ENABLE", 1):
            return []
        slices = []
        for j in range(n.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                slices.append(n.nvmlDeviceGetMigDeviceHandleByIndex(h, j))
            except n.NVMLError:
                continue  # an empty slot
        return slices

    def _handle(self, index: int) -> _Handle:
        if not 0 <= index < len(self._handles):
            raise GpuNotFound(f"no such GPU (NVML sees {len(self._handles)} devices)", index)
        return self._handles[index]

    def devices(self) -> list[DeviceInfo]:
        return [h.info for h in self._handles]

    def limits(self, index: int) -> PowerLimits:
        n, h = self._nvml, self._handle(index).power_handle

        def read() -> PowerLimits:
            lo, hi = n.nvmlDeviceGetPowerManagementLimitConstraints(h)
            return PowerLimits(int(lo), int(hi), int(n.nvmlDeviceGetPowerManagementDefaultLimit(h)),
                               int(n.nvmlDeviceGetPowerManagementLimit(h)),
                               int(n.nvmlDeviceGetEnforcedPowerLimit(h)))

        return self._call(index, "power limits", read)

    def _reasons(self, h: Any) -> int:
        n = self._nvml
        getter = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if getter is not None:
            try:
                return int(getter(h))
            except n.NVMLError as exc:
                if getattr(exc, "value", None) not in (
                        getattr(n, "NVML_ERROR_FUNCTION_NOT_FOUND", -1),
                        getattr(n, "NVML_ERROR_NOT_SUPPORTED", -1)):
                    raise
        return int(n.nvmlDeviceGetCurrentClocksThrottleReasons(h))

    def sample(self, index: int) -> Sample:
        n, h = self._nvml, self._handle(index).power_handle

        def read() -> Sample:
            power = int(n.nvmlDeviceGetPowerUsage(h))
            energy = int(n.nvmlDeviceGetTotalEnergyConsumption(h))
            temp = int(n.nvmlDeviceGetTemperature(h, getattr(n, "NVML_TEMPERATURE_GPU", 0)))
            util = int(n.nvmlDeviceGetUtilizationRates(h).gpu)
            reasons = self._reasons(h)
            enforced = int(n.nvmlDeviceGetEnforcedPowerLimit(h))
            # On the worker thread, so concurrent samplers cannot misorder readings.
            last, epoch = self._energy.get(index, (energy, 0))
            if energy < last:
                epoch += 1  # the counter restarted: the driver was reloaded
            self._energy[index] = (energy, epoch)
            return Sample(self._clock.now_ns(), power, energy, temp * 1000, util, reasons,
                          enforced, epoch)

        return self._call(index, "sample", read)

    def set_power_limit(self, index: int, mw: int) -> None:
        dev = self._handle(index)
        if dev.info.mig_parent is not None:
            raise GpuNotSupported(
                f"is a MIG slice; its power limit belongs to parent {dev.info.mig_parent}, "
                "shared by every tenant", index)
        lim = self.limits(index)
        if not lim.min_mw <= mw <= lim.max_mw:
            raise GpuInvalidArgument(
                f"power limit {mw / 1000:g} W is outside {lim.min_mw / 1000:g}-"
                f"{lim.max_mw / 1000:g} W", index, mw, lim.min_mw, lim.max_mw)
        n = self._nvml
        self._call(index, "set power limit",
                   lambda: n.nvmlDeviceSetPowerManagementLimit(dev.handle, mw))

    def persistence_mode(self, index: int) -> bool | None:
        n, h = self._nvml, self._handle(index).power_handle
        try:
            mode = self._call(index, "persistence mode",
                              lambda: n.nvmlDeviceGetPersistenceMode(h))
        except GpuNotSupported:
            return None
        return bool(mode == getattr(n, "NVML_FEATURE_ENABLED", 1))

    def close(self) -> None:
        """Shut NVML down once; later calls fail as GpuLost rather than crash."""
        if self._closed:
            return
        try:
            self._call(None, "shutdown", self._nvml.nvmlShutdown)
        finally:
            self._closed = True
