"""The NVML backend (nvidia-ml-py, `import pynvml`), with every error typed.

Facts it follows (see docs and nvml-facts): read-back uses the *enforced* limit,
not the requested one; the energy counter restarts when the driver reloads, so
each decrease bumps `Sample.energy_epoch`; a MIG slice's power belongs to its
parent GPU (`nvmlDeviceGetDeviceHandleFromMigDeviceHandle`), so slices report the
parent's readings and refuse limit changes; a MIG-enabled GPU does not report
utilisation, which then reads as unknown rather than failing the whole sample.

One GPU that is lost or denied at enumeration is left out (and listed in
`unavailable`) instead of failing the node. After a call fails because a GPU or
the driver was lost, NVML is shut down and initialised again before the next
call (at most every `reinit_interval_s`, as nvmlInit is slow), and devices are
matched again by UUID, so a GPU that comes back is governed again under the same
index. A GPU that was already missing at start is not added later.

A wedged driver can block an NVML call indefinitely, so every batch of calls
runs on a worker thread and the caller waits at most `call_timeout_s`; on a
timeout the stuck worker is abandoned (it is a daemon thread) and the call fails
as GpuLost. The pynvml module itself is injectable, so the mapping logic is
tested without a GPU against a fake module with the same names. NVML's constants
are read from the module by name, with no fallback value: every nvidia-ml-py
release has them, and a misspelt one then fails at once instead of silently
comparing against a guess.
"""

from __future__ import annotations

import contextlib
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
        self._start()

    def _start(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
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


@dataclass(slots=True)
class _Handle:
    info: DeviceInfo
    handle: Any
    power_handle: Any  # the parent GPU's handle for a MIG slice, else `handle`


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    """pynvml returns some values as ctypes objects (e.g. nvmlDeviceIsMigDeviceHandle)."""
    return int(getattr(value, "value", value))


class NvmlBackend:
    """GpuBackend over NVML. `nvml` is the pynvml module (injected in tests)."""

    unavailable: list[tuple[int, str]]  # NVML index, why it was left out at enumeration

    def __init__(self, clock: Clock = SYSTEM_CLOCK, nvml: Any = None,
                 call_timeout_s: float = 5.0, reinit_interval_s: float = 10.0) -> None:
        if nvml is None:
            try:
                import pynvml  # noqa: PLC0415 (lazy: only NVML nodes need it)
            except ImportError as exc:
                raise GpuLost(f"NVML bindings unavailable: {exc}") from None
            nvml = pynvml
        self._nvml = nvml
        self._clock = clock
        self._timeout = call_timeout_s
        self._reinit_ns = int(reinit_interval_s * 1_000_000_000)
        self._worker = CallGuard()
        self._codes = {getattr(nvml, name): cls for name, cls in _ERROR_MAP
                       if hasattr(nvml, name)}
        self._energy: dict[int, tuple[int, int]] = {}  # index -> (last mJ, epoch)
        self._closed = False
        self._stale = False  # a GPU or the driver was lost: initialise NVML again
        self._last_reinit_ns: int | None = None
        self.reinits = 0
        self._call(None, "init", nvml.nvmlInit)
        try:
            self._handles, self.unavailable = self._call(None, "device enumeration",
                                                         self._enumerate)
        except GpuError:
            # Undo the init; a failure here must not hide why enumeration failed.
            with contextlib.suppress(GpuError):
                self._call(None, "shutdown", nvml.nvmlShutdown)
            raise

    def _error(self, exc: Any) -> type[GpuError]:
        """The typed error for an NVMLError (its `value` is the NVML return code)."""
        return self._codes.get(exc.value, GpuError)

    def _call(self, index: int | None, what: str, fn: Callable[[], T]) -> T:
        """Run fn on the worker with the timeout, mapping NVMLError to typed errors."""
        if self._closed:
            raise GpuLost("NVML backend is closed", index)
        if self._stale:
            self._reinit()
        try:
            return self._worker.call(fn, self._timeout, what)
        except GpuLost as exc:  # a call that did not return: never re-initialise into it
            if index is not None:  # the guard's errors name no GPU: name the caller's
                raise GpuLost(exc.message, index) from None
            raise
        except self._nvml.NVMLError as exc:
            cls = self._error(exc)
            if cls is GpuLost and index is not None:
                self._stale = True
            raise cls(f"NVML {what}: {exc}", index) from None

    # -- enumeration and recovery ----------------------------------------------
    def _enumerate(self) -> tuple[list[_Handle], list[tuple[int, str]]]:
        """Every usable device, physical GPUs first, then MIG slices; one bad GPU
        (NoPermission, GpuIsLost) is left out and named, never fails the node."""
        n = self._nvml
        out: list[_Handle] = []
        skipped: list[tuple[int, str]] = []
        physical = []
        for i in range(n.nvmlDeviceGetCount()):
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
                info = DeviceInfo(
                    index=len(out), minor=n.nvmlDeviceGetMinorNumber(h),
                    pci_bus_id=_text(n.nvmlDeviceGetPciInfo(h).busId),
                    uuid=_text(n.nvmlDeviceGetUUID(h)), name=_text(n.nvmlDeviceGetName(h)))
            except n.NVMLError as exc:
                skipped.append((i, f"{self._error(exc).__name__}: {exc}"))
                continue
            out.append(_Handle(info, h, h))
            physical.append((info, h))
        for parent, h in physical:
            for mig in self._mig_slices(h):
                try:
                    power = n.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
                    info = DeviceInfo(index=len(out), minor=parent.minor,
                                      pci_bus_id=parent.pci_bus_id,
                                      uuid=_text(n.nvmlDeviceGetUUID(mig)),
                                      name=_text(n.nvmlDeviceGetName(mig)),
                                      mig_parent=parent.uuid)
                except n.NVMLError as exc:
                    skipped.append((parent.index, f"MIG slice: {self._error(exc).__name__}: "
                                                  f"{exc}"))
                    continue
                out.append(_Handle(info, mig, power))
        return out, skipped

    def _mig_slices(self, h: Any) -> list[Any]:
        n = self._nvml
        try:
            current, _pending = n.nvmlDeviceGetMigMode(h)
        except n.NVMLError:
            return []  # not MIG-capable
        if current != n.NVML_DEVICE_MIG_ENABLE:
            return []
        slices = []
        for j in range(n.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                mig = n.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except n.NVMLError:
                continue  # an empty slot
            if _int(n.nvmlDeviceIsMigDeviceHandle(mig)):
                slices.append(mig)
        return slices

    def _reinit(self) -> None:
        """Shut NVML down and initialise it again; re-match devices by UUID."""
        now = self._clock.monotonic_ns()
        if self._last_reinit_ns is not None and now - self._last_reinit_ns < self._reinit_ns:
            return
        self._last_reinit_ns = now
        n = self._nvml

        def again() -> list[_Handle]:
            with contextlib.suppress(n.NVMLError):  # already uninitialised: driver gone
                n.nvmlShutdown()
            n.nvmlInit()
            return self._enumerate()[0]

        try:
            fresh = {h.info.uuid: h for h in self._worker.call(again, self._timeout,
                                                               "re-initialisation")}
        except (GpuLost, n.NVMLError):
            return  # still gone: stay stale, try again after the interval
        missing = False
        for old in self._handles:
            new = fresh.get(old.info.uuid)
            if new is None:
                missing = True  # still lost: its calls fail until it is found again
            else:
                old.handle, old.power_handle = new.handle, new.power_handle
        self._stale = missing
        self.reinits += 1

    def _handle(self, index: int) -> _Handle:
        if not 0 <= index < len(self._handles):
            raise GpuNotFound(f"no such GPU (NVML sees {len(self._handles)} devices)", index)
        return self._handles[index]

    # -- the GpuBackend protocol -----------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return [h.info for h in self._handles]

    def limits(self, index: int) -> PowerLimits:
        n, dev = self._nvml, self._handle(index)

        def read() -> PowerLimits:
            h = dev.power_handle
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
                if exc.value not in (n.NVML_ERROR_FUNCTION_NOT_FOUND,
                                     n.NVML_ERROR_NOT_SUPPORTED):
                    raise
        return int(n.nvmlDeviceGetCurrentClocksThrottleReasons(h))

    def _util(self, h: Any) -> int | None:
        """GPU utilisation %, or None where NVML has none (a MIG-enabled GPU)."""
        n = self._nvml
        try:
            return int(n.nvmlDeviceGetUtilizationRates(h).gpu)
        except n.NVMLError as exc:
            if exc.value == n.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise

    def sample(self, index: int) -> Sample:
        n, dev = self._nvml, self._handle(index)

        def read() -> Sample:
            h = dev.power_handle
            power = int(n.nvmlDeviceGetPowerUsage(h))
            energy = int(n.nvmlDeviceGetTotalEnergyConsumption(h))
            # NVML reports whole degrees C; samples carry millidegrees.
            temp_c = int(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
            util = self._util(h)
            reasons = self._reasons(h)
            enforced = int(n.nvmlDeviceGetEnforcedPowerLimit(h))
            # On the worker thread, so concurrent samplers cannot misorder readings.
            last, epoch = self._energy.get(index, (energy, 0))
            if energy < last:
                epoch += 1  # the counter restarted: the driver was reloaded
            self._energy[index] = (energy, epoch)
            return Sample(self._clock.now_ns(), power, energy, temp_c * 1000, util, reasons,
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
        n, dev = self._nvml, self._handle(index)
        try:
            mode = self._call(index, "persistence mode",
                              lambda: n.nvmlDeviceGetPersistenceMode(dev.power_handle))
        except GpuNotSupported:
            return None
        return bool(mode == n.NVML_FEATURE_ENABLED)

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        """`nvidia-smi -pm 1`: keeps the driver loaded, so a cap survives an idle GPU."""
        n, dev = self._nvml, self._handle(index)
        mode = n.NVML_FEATURE_ENABLED if enabled else n.NVML_FEATURE_DISABLED
        self._call(index, "set persistence mode",
                   lambda: n.nvmlDeviceSetPersistenceMode(dev.power_handle, mode))

    def close(self) -> None:
        """Shut NVML down once; later calls fail as GpuLost rather than crash."""
        if self._closed:
            return
        try:
            self._call(None, "shutdown", self._nvml.nvmlShutdown)
        finally:
            self._closed = True
