"""A simulated GPU fleet whose state lives in a directory, shared by every process.

`SimFleet` is the out-of-band side (what `sparkctl sim` drives: load, faults, an
admin's `nvidia-smi -pl`); `SimBackend` is the GpuBackend the daemon uses. Both
read the same files, so a limit changed by one is seen by the other, exactly as
on a real node where the daemon and `nvidia-smi` share one driver.

Every process must use the same kind of clock on one fleet: state is stamped
with `clock.now_ns()`, so a ManualClock in one process and the system clock in
another (e.g. a `sparkctl sim` subprocess) would disagree about "now".
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import (
    GpuInvalidArgument,
    GpuLost,
    GpuNoPermission,
    GpuNotFound,
    InputError,
    SimStateError,
)
from spark_slurm.gpu.backend import DeviceInfo, PowerLimits, Sample
from spark_slurm.gpu.sim_physics import (
    FAULT_KINDS,
    Fault,
    GpuState,
    SimModel,
    evolve,
    initial_state,
    model_named,
    reasons,
)
from spark_slurm.gpu.sim_state import (
    FleetConfig,
    config_path,
    read_config,
    read_gpu,
    update_gpu,
    write_config,
    write_gpu,
)

# Instant events and housekeeping accepted by `inject_fault` besides FAULT_KINDS.
INSTANT_KINDS = ("driver-reload", "clear")
_Change = Callable[[GpuState, int], GpuState]  # (state evolved to now, now_ns) -> new state
_PCI_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_NAMESPACE = uuid.UUID("6f1c2a4e-5b7d-4e8f-9a0b-1c2d3e4f5a6b")


def _pci_bus_id(index: int) -> str:
    """Bus ids as on an 8-GPU HGX board; a further board per 8 GPUs gets its own domain."""
    domain, slot = divmod(index, len(_PCI_BUSES))
    return f"{domain:08X}:{_PCI_BUSES[slot]:02X}:00.0"


@dataclass(frozen=True, slots=True)
class SmiRow:
    """One GPU as an out-of-band tool sees it; `error` set when the GPU cannot answer."""

    device: DeviceInfo
    limits: PowerLimits | None
    sample: Sample | None
    persistence: bool | None
    error: str | None


@dataclass(frozen=True, slots=True)
class LimitChange:
    """One limit changed out of band: what was requested before and after."""

    device: DeviceInfo
    old_mw: int
    new_mw: int


class SimFleet:
    """The simulated GPUs in one state directory (create with `init`, reopen with `open`)."""

    def __init__(self, root: Path, config: FleetConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.root = root
        self.config = config
        self.clock = clock

    @property
    def model(self) -> SimModel:
        return self.config.model

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        return self.config.devices

    @classmethod
    def open(cls, root: Path | str, clock: Clock = SYSTEM_CLOCK) -> SimFleet:
        root = Path(root)
        return cls(root, read_config(root), clock)

    @classmethod
    def init(cls, root: Path | str, gpus: int, model: str = "b200", *,
             clock: Clock = SYSTEM_CLOCK, minor_base: int = 0,
             minors: Sequence[int] | None = None, name: str | None = None,
             min_mw: int | None = None, max_mw: int | None = None,
             default_mw: int | None = None, force: bool = False) -> SimFleet:
        """Create N idle GPUs of a named model; minors default to minor_base + index.

        UUIDs derive from `name` (default: the directory's absolute path), so they
        are stable for one fleet and differ between fleets.
        """
        root = Path(root)
        if not 1 <= gpus <= 64:
            raise InputError(f"--gpus must be between 1 and 64, not {gpus}")
        overrides = {k: v for k, v in (("min_mw", min_mw), ("max_mw", max_mw),
                                       ("default_mw", default_mw)) if v is not None}
        if max_mw is not None:
            overrides["peak_mw"] = max_mw
            overrides.setdefault("default_mw", max_mw)
        spec = model_named(model, **overrides)
        if minors is None:
            if minor_base < 0:
                raise InputError(f"--minor-base must be >= 0, not {minor_base}")
            minors = [minor_base + i for i in range(gpus)]
        minors = list(minors)
        if len(minors) != gpus or len(set(minors)) != gpus or min(minors) < 0:
            raise InputError(f"--minors must list {gpus} distinct non-negative numbers")
        if root.exists() and not root.is_dir():
            raise SimStateError("exists and is not a directory", str(root))
        if config_path(root).exists() and not force:
            raise SimStateError("already holds a simulated fleet (use --force to replace it)",
                                str(root))
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("gpu*.json"):  # a replaced fleet may have had more GPUs
            stale.unlink()
        key = model.lower()
        name = str(root.resolve()) if name is None else name
        devices = tuple(
            DeviceInfo(index=i, minor=minors[i], pci_bus_id=_pci_bus_id(i),
                       uuid="GPU-" + str(uuid.uuid5(_NAMESPACE, f"{name}/{key}/{i}")),
                       name=spec.name)
            for i in range(gpus))
        now = clock.now_ns()
        for i in range(gpus):
            write_gpu(root, i, initial_state(spec, now))
        config = FleetConfig(key, spec, devices)
        write_config(root, config)  # written last: a fleet exists only once complete
        return cls(root, config, clock)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.config.devices):
            raise GpuNotFound(f"no such simulated GPU (fleet has {len(self.config.devices)})",
                              index)

    def state(self, index: int) -> GpuState:
        """The GPU's state now (evaluated lazily; nothing is written)."""
        self._check_index(index)
        return evolve(self.model, read_gpu(self.root, index), self.clock.now_ns())

    def change(self, index: int, fn: _Change) -> GpuState:
        """Evolve the stored state to now, apply fn, store it atomically."""
        self._check_index(index)
        now = self.clock.now_ns()
        return update_gpu(self.root, index, lambda s: fn(evolve(self.model, s, now), now))

    def _targets(self, index: int | None) -> list[int]:
        if index is None:
            return list(range(len(self.config.devices)))
        self._check_index(index)
        return [index]

    def set_load(self, util: float, index: int | None = None) -> None:
        """Set the workload's utilisation (0..1) on one GPU or all."""
        if not 0.0 <= util <= 1.0:  # also refuses NaN
            raise InputError(f"utilisation must be a fraction between 0 and 1, not {util}")
        for i in self._targets(index):
            self.change(i, lambda s, _now: replace(s, util=util))

    def inject_fault(self, index: int, kind: str, seconds: float | None = None) -> None:
        """Start a fault (for `seconds`, or until cleared), or apply an instant event."""
        if kind not in FAULT_KINDS + INSTANT_KINDS:
            raise InputError(f"unknown fault {kind!r} (choose from "
                             f"{', '.join(FAULT_KINDS + INSTANT_KINDS)})")
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise InputError(f"--for must be a positive number of seconds, not {seconds}")
        if kind == "clear":
            self.change(index, lambda s, _now: replace(s, faults=()))
            return
        if kind == "driver-reload":
            model = self.model

            def reload(s: GpuState, _now: int) -> GpuState:
                return replace(s, energy_mj=0.0, energy_epoch=s.energy_epoch + 1,
                               requested_mw=model.default_mw)

            self.change(index, reload)
            return

        def start(s: GpuState, now: int) -> GpuState:
            end = None if seconds is None else now + int(seconds * 1_000_000_000)
            kept = tuple(f for f in s.faults if f.kind != kind)
            return replace(s, faults=(*kept, Fault(kind, now, end, s.enforced_mw())))

        self.change(index, start)

    def oob_set_limit(self, index: int | None, mw: int) -> list[LimitChange]:
        """Change limits around the daemon (one GPU, or all), as `nvidia-smi -pl` would."""
        changes = []
        for i in self._targets(index):
            old = self.limits(i).requested_mw
            self.set_limit(i, mw)
            changes.append(LimitChange(self.config.devices[i], old, mw))
        return changes

    def set_persistence(self, index: int | None, enabled: bool) -> list[DeviceInfo]:
        """Turn persistence mode on or off (`nvidia-smi -pm`); returns the GPUs changed."""
        changed = []
        for i in self._targets(index):
            self.alive_state(i)
            self.change(i, lambda s, _now: replace(s, persistence=enabled))
            changed.append(self.config.devices[i])
        return changed

    def set_limit(self, index: int, mw: int) -> None:
        """Set the requested limit; the same driver path for the daemon and for admins."""
        model = self.model
        if mw <= 0:
            raise GpuInvalidArgument(f"power limit must be a positive number of watts, not "
                                     f"{mw / 1000:g} W", index, mw, model.min_mw, model.max_mw)

        def apply(s: GpuState, _now: int) -> GpuState:
            if s.fault("driver-crash") is not None:
                raise GpuLost("GPU is lost (simulated driver crash)", index)
            if s.fault("no-permission") is not None:
                raise GpuNoPermission("insufficient permissions to change the power limit",
                                      index)
            if not model.min_mw <= mw <= model.max_mw:
                raise GpuInvalidArgument(
                    f"power limit {mw / 1000:g} W is outside {model.min_mw // 1000}-"
                    f"{model.max_mw // 1000} W", index, mw, model.min_mw, model.max_mw)
            return replace(s, requested_mw=mw)  # a silent mismatch keeps enforcing held_mw

        self.change(index, apply)

    def limits(self, index: int) -> PowerLimits:
        s = self.alive_state(index)
        return self._limits(s)

    def _limits(self, s: GpuState) -> PowerLimits:
        m = self.model
        return PowerLimits(m.min_mw, m.max_mw, m.default_mw, s.requested_mw, s.enforced_mw())

    def alive_state(self, index: int) -> GpuState:
        """The state now, or GpuLost while a driver crash lasts."""
        s = self.state(index)
        if s.fault("driver-crash") is not None:
            raise GpuLost("GPU is lost (simulated driver crash)", index)
        return s

    def sample(self, index: int) -> Sample:
        s = self.alive_state(index)
        return self._sample(s, self.clock.now_ns())

    def _sample(self, s: GpuState, now: int) -> Sample:
        return Sample(time_ns=now, power_mw=round(s.power_mw), energy_mj=int(s.energy_mj),
                      temp_mc=round(s.temp_mc), util_pct=round(s.util * 100),
                      reasons=reasons(self.model, s), enforced_mw=s.enforced_mw(),
                      energy_epoch=s.energy_epoch)

    def smi(self, index: int | None = None) -> list[SmiRow]:
        """What an `nvidia-smi` query shows, GPU by GPU (lost GPUs carry their error)."""
        rows = []
        now = self.clock.now_ns()
        for i in self._targets(index):
            dev = self.config.devices[i]
            s = self.state(i)
            if s.fault("driver-crash") is not None:
                rows.append(SmiRow(dev, None, None, None, "GPU is lost"))
                continue
            rows.append(SmiRow(dev, self._limits(s), self._sample(s, now), s.persistence, None))
        return rows


class SimBackend:
    """The GpuBackend over a SimFleet: what the daemon sees through "NVML"."""

    def __init__(self, root: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.fleet = SimFleet.open(root, clock)

    def devices(self) -> list[DeviceInfo]:
        return list(self.fleet.devices)

    def limits(self, index: int) -> PowerLimits:
        return self.fleet.limits(index)

    def sample(self, index: int) -> Sample:
        return self.fleet.sample(index)

    def set_power_limit(self, index: int, mw: int) -> None:
        self.fleet.set_limit(index, mw)

    def persistence_mode(self, index: int) -> bool | None:
        return self.fleet.alive_state(index).persistence

    def set_persistence_mode(self, index: int, enabled: bool) -> None:
        self.fleet.set_persistence(index, enabled)

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""
