"""Path 1 and the apply step: telemetry before, set the limit, read back what is enforced.

Slurm GPU indices are what PERs and requests name; the backend has its own
indices, so every call goes through the Slurm→backend map built once at start
(`gpu.mapping.slurm_device_map`: gres.conf order, else minor numbers). Every
failure becomes data in the per-GPU entry, never an exception, so a PER always
says exactly what happened to each GPU.

Read-back is judged, not compared: a driver that stores the limit rounded (to
the watt, say) is `rounded`, and a GPU that keeps our requested limit while
another limiter (the BMC, a facility controller) enforces a lower one is
`lower-limiter`; both hold the cap and are recorded as such. Only an enforced
limit that is neither is a mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import GpuError
from spark_slurm.gpu.backend import DeviceInfo, GpuBackend, PowerLimits, Sample
from spark_slurm.gpu.mapping import slurm_device_map

log = logging.getLogger("sparkd.actuation")

READBACK_TOLERANCE_MW = 1000
"""Driver rounding accepted at read-back (NVML limits are set in mW, stored coarser)."""

T = TypeVar("T")


class SampleSource(Protocol):
    def latest(self, index: int) -> Any: ...


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class Energy:
    """Energy used between two readings, robust to a counter reset (driver reload)."""

    energy_mj: int
    reset: bool


def energy_between(start_mj: int, start_epoch: int, end: Sample) -> Energy:
    """Counter delta; after a reset only the energy since the reset is known (a lower bound)."""
    if end.energy_epoch != start_epoch or end.energy_mj < start_mj:
        return Energy(end.energy_mj, True)
    return Energy(end.energy_mj - start_mj, False)


def judge_readback(intended_mw: int, limits: PowerLimits,
                   tolerance_mw: int = READBACK_TOLERANCE_MW) -> str:
    """`exact`, `rounded`, `lower-limiter` or `mismatch` (the only one that fails)."""
    enforced = limits.enforced_mw
    if enforced == intended_mw:
        return "exact"
    if abs(enforced - intended_mw) <= tolerance_mw:
        return "rounded"
    if enforced < intended_mw and abs(limits.requested_mw - intended_mw) <= tolerance_mw:
        return "lower-limiter"
    return "mismatch"


class Actuator:
    """The daemon's only path to GPU limits; knows devices by Slurm index."""

    def __init__(self, gpu: GpuBackend, sampler: SampleSource | None = None,
                 max_sample_age_ns: int = 250_000_000, parallel: int = 8, *,
                 clock: Clock = SYSTEM_CLOCK, slurm_map: Mapping[int, int] | None = None,
                 readback_tolerance_mw: int = READBACK_TOLERANCE_MW) -> None:
        self.gpu = gpu
        self.sampler = sampler
        self.max_sample_age_ns = max_sample_age_ns
        self.tolerance_mw = readback_tolerance_mw
        self._clock = clock
        found = gpu.devices()
        if slurm_map is None:
            slurm_map, _ = slurm_device_map(found)
        by_index = {d.index: d for d in found}
        self._index: dict[int, int] = {k: i for k, i in slurm_map.items() if i in by_index}
        self.devices: dict[int, DeviceInfo] = {k: by_index[i] for k, i in self._index.items()}
        self.persistence: dict[int, bool | None] = {}
        self._bounds: dict[int, tuple[int, int]] = {}
        # Driver calls block on I/O (ioctl, or the sim's files): a job's GPUs go in parallel.
        self._parallel = max(1, parallel)
        self._pool = ThreadPoolExecutor(max_workers=self._parallel,
                                        thread_name_prefix="gpu-call")

    def each(self, minors: list[int], fn: Callable[[int], T]) -> list[T]:
        """`fn` applied to every GPU at once, results in the order given."""
        if len(minors) <= 1 or self._parallel == 1:
            return [fn(m) for m in minors]
        return list(self._pool.map(fn, minors))

    def index(self, minor: int) -> int:
        """The backend index of Slurm GPU `minor` (PERs and requests name the latter)."""
        return self._index[minor]

    def agrees(self, governed_mw: int, enforced_mw: int) -> bool:
        """Whether an enforced limit is the governed one, up to driver rounding."""
        return abs(enforced_mw - governed_mw) <= self.tolerance_mw

    def check_persistence(self, enable: bool = False) -> dict[int, bool | None]:
        """Read (and, when asked, turn on) persistence mode on every physical GPU.

        With it off an idle driver unloads and the cap is lost, so an off GPU is
        logged as a warning; None means the GPU does not report it."""
        seen: dict[str, bool | None] = {}
        for minor, dev in sorted(self.devices.items()):
            parent = dev.mig_parent or dev.uuid
            if parent not in seen:
                try:
                    mode = self.gpu.persistence_mode(self.index(minor))
                    if mode is False and enable:
                        self.gpu.set_persistence_mode(self.index(minor), True)
                        mode = self.gpu.persistence_mode(self.index(minor))
                        log.info("GPU %s: persistence mode turned on", minor)
                except GpuError as exc:
                    log.warning("GPU %s: persistence mode: %s", minor, exc)
                    mode = None
                if mode is False:
                    log.warning("GPU %s: persistence mode is off: the driver may unload when "
                                "the GPU is idle and its power cap is then lost "
                                "(set gpu.persistence: enable, or nvidia-smi -pm 1)", minor)
                seen[parent] = mode
            self.persistence[minor] = seen[parent]
        return dict(self.persistence)

    def known(self, minor: int) -> bool:
        return minor in self.devices

    def sample(self, minor: int) -> Sample:
        """A fresh sample: the sampler's latest when at most `max_sample_age_ns` old,
        else a direct read (a stalled or slow sampler must not pass off an old
        reading as the state before a change, or as a job's start energy)."""
        if self.sampler is not None:
            latest = self.sampler.latest(self.index(minor))
            if isinstance(latest, Sample) and \
                    self._clock.now_ns() - latest.time_ns <= self.max_sample_age_ns:
                return latest
        return self.gpu.sample(self.index(minor))

    def before(self, minor: int) -> tuple[dict[str, Any], int | None, str | None]:
        """Path 1 before a change: telemetry dict, the enforced limit, and any error."""
        idx = self.index(minor)
        try:
            limits = self.gpu.limits(idx)
            s = self.sample(minor)
        except GpuError as exc:
            return {}, None, error_text(exc)
        return ({"time_ns": s.time_ns, "power_mw": s.power_mw, "energy_mj": s.energy_mj,
                 "energy_epoch": s.energy_epoch, "temp_mc": s.temp_mc, "util_pct": s.util_pct,
                 "limit_mw": limits.requested_mw, "enforced_mw": limits.enforced_mw,
                 "reasons": s.reasons, "min_mw": limits.min_mw, "max_mw": limits.max_mw,
                 "default_mw": limits.default_mw,
                 **({"persistence": self.persistence[minor]}
                    if minor in self.persistence else {})},
                limits.enforced_mw, None)

    def apply(self, minor: int, mw: int) -> dict[str, Any]:
        """Set, then read back the enforced limit; the entry records both and `ok`.

        When the enforced limit is not exactly the intended one, `readback` says
        why (see `judge_readback`) and `requested_readback_mw` what NVML holds as
        the requested limit, so the PER tells rounding and another limiter apart."""
        idx = self.index(minor)
        entry: dict[str, Any] = {"index": minor, "uuid": self.devices[minor].uuid,
                                 "intended_mw": mw}
        try:
            self.gpu.set_power_limit(idx, mw)
        except GpuError as exc:
            entry["error"] = error_text(exc)
        try:
            limits = self.gpu.limits(idx)
        except GpuError as exc:
            entry.setdefault("error", error_text(exc))  # a failed set's error comes first
            entry["ok"] = False
            return entry
        entry["readback_mw"] = limits.enforced_mw
        verdict = judge_readback(mw, limits, self.tolerance_mw)
        if verdict != "exact":
            entry["readback"] = verdict
            entry["requested_readback_mw"] = limits.requested_mw
        entry["ok"] = "error" not in entry and verdict != "mismatch"
        return entry

    def hw_range(self, minors: list[int]) -> tuple[int, int]:
        """The tightest hardware range over the GPUs (min of maxes, max of mins)."""
        lows, highs = [], []
        for minor in minors:
            bounds = self._bounds.get(minor)
            if bounds is None:  # constraints are fixed per device: read once
                try:
                    limits = self.gpu.limits(self.index(minor))
                except GpuError:
                    continue
                bounds = self._bounds[minor] = (limits.min_mw, limits.max_mw)
            lows.append(bounds[0])
            highs.append(bounds[1])
        if not lows:
            return 0, 0
        return max(lows), min(highs)

    def mig_targets(self, minors: list[int]) -> tuple[list[int], str | None]:
        """Map requested GPUs to limit-bearing devices; refuse a shared MIG parent."""
        targets: list[int] = []
        for minor in minors:
            dev = self.devices[minor]
            if dev.mig_parent is None:
                if minor not in targets:
                    targets.append(minor)
                continue
            siblings = [m for m, d in self.devices.items() if d.mig_parent == dev.mig_parent]
            outside = [m for m in siblings if m not in minors]
            if outside:
                return [], (f"GPU {minor} is a MIG slice of {dev.mig_parent}, whose power limit "
                            f"is shared with slices {outside} outside this job; a MIG power "
                            "request never changes a shared parent GPU")
            parents = [m for m, d in self.devices.items() if d.uuid == dev.mig_parent]
            if not parents:
                return [], (f"GPU {minor} is a MIG slice whose parent {dev.mig_parent} is not "
                            "visible to the daemon")
            if parents[0] not in targets:
                targets.append(parents[0])
        return targets, None
