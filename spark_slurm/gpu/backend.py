"""The GPU backend contract: what the daemon may ask of any GPU, real or simulated.

Everything is in integer units (mW, mJ, m°C, ns) so values go straight into
PER bodies. Backends are chosen by name through `open_backend`; each one maps
its own failures onto the typed errors in `spark_slurm.errors` (GpuError tree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import GpuNotFound, InputError

# Clock-event ("throttle") reason bits, as NVML defines them.
REASON_GPU_IDLE = 0x1
REASON_APP_CLOCKS = 0x2
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SYNC_BOOST = 0x10
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80

REASON_NAMES: dict[int, str] = {
    REASON_GPU_IDLE: "GpuIdle",
    REASON_APP_CLOCKS: "ApplicationsClocksSetting",
    REASON_SW_POWER_CAP: "SwPowerCap",
    REASON_HW_SLOWDOWN: "HwSlowdown",
    REASON_SYNC_BOOST: "SyncBoost",
    REASON_SW_THERMAL: "SwThermalSlowdown",
    REASON_HW_THERMAL: "HwThermalSlowdown",
    REASON_HW_POWER_BRAKE: "HwPowerBrakeSlowdown",
}


def reason_names(mask: int) -> list[str]:
    """Names of the set reason bits, lowest bit first (for display and PERs)."""
    return [name for bit, name in sorted(REASON_NAMES.items()) if mask & bit]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Identity of one device; `minor` is N in /dev/nvidiaN, what Slurm's File= names."""

    index: int
    minor: int
    pci_bus_id: str
    uuid: str
    name: str
    mig_parent: str | None = None  # parent GPU's UUID when this is a MIG slice


@dataclass(frozen=True, slots=True)
class PowerLimits:
    """Constraints and the two limits that can differ: requested vs actually enforced."""

    min_mw: int
    max_mw: int
    default_mw: int
    requested_mw: int
    enforced_mw: int


@dataclass(frozen=True, slots=True)
class Sample:
    """One telemetry reading. `energy_epoch` increases whenever the counter reset.

    `util_pct` is None where the driver has no utilisation (a MIG-enabled GPU)."""

    time_ns: int
    power_mw: int
    energy_mj: int
    temp_mc: int
    util_pct: int | None
    reasons: int
    enforced_mw: int
    energy_epoch: int = 0


@runtime_checkable
class GpuBackend(Protocol):
    """One node's GPUs. Every method raises a GpuError subclass on failure."""

    def devices(self) -> list[DeviceInfo]: ...

    def limits(self, index: int) -> PowerLimits: ...

    def sample(self, index: int) -> Sample: ...

    def set_power_limit(self, index: int, mw: int) -> None: ...

    def persistence_mode(self, index: int) -> bool | None: ...

    def set_persistence_mode(self, index: int, enabled: bool) -> None: ...

    def close(self) -> None: ...


class NoGpus:
    """A host without GPUs, e.g. the Slurm controller, whose sparkd only turns
    job_submit.lua's denials into PERs: no devices, and asking for one is an error."""

    def devices(self) -> list[DeviceInfo]:
        return []

    def _none(self, index: int) -> GpuNotFound:
        return GpuNotFound("this host has no GPUs (gpu.backend: none)", index)

    def limits(self, index: int) -> PowerLimits:
        raise self._none(index)

    def sample(self, index: int) -> Sample:
        raise self._none(index)

    def set_power_limit(self, index: int, mw: int) -> None:
        raise self._none(index)

    def persistence_mode(self, index: int) -> bool | None:
        raise self._none(index)

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        raise self._none(index)

    def close(self) -> None:
        pass


BACKENDS = ("sim", "nvml", "none")


def open_backend(name: str, *, state_dir: Path | str | None = None,
                 clock: Clock = SYSTEM_CLOCK, **options: Any) -> GpuBackend:
    """Open a backend by its configured name ("sim" needs `state_dir`)."""
    if name == "sim":
        if state_dir is None:
            raise InputError("gpu backend 'sim' needs a state_dir")
        from spark_slurm.gpu.sim import SimBackend  # noqa: PLC0415 (lazy by design)

        return SimBackend(Path(state_dir), clock=clock)
    if name == "nvml":
        from spark_slurm.gpu.nvml import NvmlBackend  # noqa: PLC0415 (pynvml is lazy)

        return NvmlBackend(clock=clock, **options)
    if name == "none":
        return NoGpus()
    raise InputError(f"unknown gpu backend {name!r} (choose from {', '.join(BACKENDS)})")
