"""The daemon's own power actions: drift detection, thermal guard, driver-fault handling.

One monitor thread looks at every GPU each period (≤ 1 s, shorter when the
policy's `thermal.interval_s` asks for it). A decision to act is
re-checked under the actuation lock, so a prolog that is changing a limit at that
moment is never mistaken for drift. Each action is a PER naming
`automation:<what>` as its authority.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spark_slurm.daemon.actuation import Actuator, error_text
from spark_slurm.daemon.contracts import PolicyLike, ReceiptLike
from spark_slurm.daemon.pipeline import Pipeline
from spark_slurm.daemon.state import Throttle
from spark_slurm.errors import GpuError
from spark_slurm.gpu.backend import PowerLimits, Sample

if TYPE_CHECKING:
    from spark_slurm.daemon.executors import ExecutorGate

log = logging.getLogger("sparkd.automations")
MIN_PERIOD_S = 0.05
"""The shortest pause between looks, whatever the policy asks (as config allows)."""

Counter = Callable[[str], None]


@dataclass(slots=True)
class _Seen:
    """The last good reading of a GPU, to judge what happened across a gap."""

    time_ns: int
    energy_mj: int
    energy_epoch: int


@dataclass(slots=True)
class _Fault:
    future: Future[ReceiptLike]
    last: _Seen | None
    expected_mw: int | None


class Monitor:
    """Periodic checks of every GPU; acts through the pipeline's actuator and lock."""

    def __init__(self, pipeline: Pipeline, policy: Callable[[], PolicyLike], *,
                 period_s: float = 0.5, count: Counter | None = None,
                 on_sample: Callable[[int, Sample], None] | None = None,
                 executors: ExecutorGate | None = None) -> None:
        self.pipeline = pipeline
        self.executors = executors
        self.actuator: Actuator = pipeline.actuator
        self.state = pipeline.state
        self.policy = policy
        self.period_s = period_s
        self.count = count or (lambda _name: None)
        self.on_sample = on_sample
        self._seen: dict[int, _Seen] = {}
        self._faults: dict[int, _Fault] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> None:
        """Take a first reading of every GPU (the baseline for reset detection), then run."""
        for minor in self._watched():
            try:
                sample = self.actuator.gpu.sample(self.actuator.index(minor))
            except GpuError:
                continue
            self._seen[minor] = _Seen(sample.time_ns, sample.energy_mj, sample.energy_epoch)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def current_period(self) -> float:
        """Seconds between looks: `automations.period_s`, or the policy's
        `thermal.interval_s` when that is shorter (the guard must look at least that
        often); read each time, so a reloaded policy takes effect at the next look."""
        settings = getattr(self.policy().settings, "thermal", None)
        interval = getattr(settings, "interval_s", None) \
            if getattr(settings, "enabled", False) else None
        if isinstance(interval, (int, float)) and interval > 0:
            return max(MIN_PERIOD_S, min(self.period_s, float(interval)))
        return self.period_s

    def _run(self) -> None:
        while not self._stop.wait(self.current_period()):
            try:
                self.tick()
            except Exception:
                log.exception("monitor tick failed")

    def _body(self, gpu: int, authority: str, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"v": 1, "node": self.pipeline.node, "gpu": gpu,
                                "source": "automation", "authority": authority,
                                "requester": {"uid": 0, "user": "sparkd", "role": "automation"}}
        owner = self.state.owner_of(gpu)
        if owner is not None:
            body["job_id"] = owner
        body.update(extra)
        return body

    def _watched(self) -> list[int]:
        """Every GPU that holds a power limit: a MIG slice's readings are its parent's."""
        return [m for m, d in sorted(self.actuator.devices.items()) if d.mig_parent is None]

    def tick(self) -> None:
        """One pass over every GPU (public so tests can step the monitor)."""
        for minor in self._watched():
            try:
                sample = self.actuator.gpu.sample(self.actuator.index(minor))
            except GpuError as exc:
                self._fault(minor, exc)
                continue
            if self.on_sample is not None:
                self.on_sample(minor, sample)
            recovered = self._recover(minor, sample)
            gate = self.executors
            if gate is not None and gate.validate_only(minor):
                # an external executor owns this GPU's limit: watch it, never set it
                gate.watch(minor, sample, functools.partial(self._cause, minor,
                                                            recovered=recovered))
            else:
                self._thermal(minor, sample)
                self._drift(minor, sample, recovered)
            self._seen[minor] = _Seen(sample.time_ns, sample.energy_mj, sample.energy_epoch)
        if self.executors is not None:
            self.executors.settle()

    # -- driver faults -------------------------------------------------------
    def _fault(self, minor: int, exc: GpuError) -> None:
        if minor in self._faults:
            return
        expected = self.state.governed.get(minor)
        body = self._body(minor, "automation:fault", error=error_text(exc))
        if expected is not None:
            body["expected_mw"] = expected
        last = self._seen.get(minor)
        if last is not None:
            body["last_seen_ns"] = last.time_ns
        with self.pipeline.lock:
            future = self.pipeline.writer.submit("fault", body)
            self.state.faults[minor] = future
        self._faults[minor] = _Fault(future, last, expected)
        self.count("fault")
        log.warning("GPU %s: fault recorded: %s", minor, exc)

    def _recover(self, minor: int, sample: Sample) -> bool:
        fault = self._faults.pop(minor, None)
        if fault is None:
            return False
        ref = fault.future.result(timeout=60)
        expected = fault.expected_mw
        body = self._body(minor, "automation:fault", ref={"seq": ref.seq, "hash": ref.hash},
                          enforced_mw=sample.enforced_mw)
        held = expected is not None and self.actuator.agrees(expected, sample.enforced_mw)
        last = fault.last
        if last is None:
            # Lost before the monitor's first good reading: the outage's start and the
            # energy used over it are unknown, so nothing proves the ceiling held.
            held = False
        else:
            reset = sample.energy_epoch != last.energy_epoch or sample.energy_mj < last.energy_mj
            span = sample.time_ns - last.time_ns
            body["outage_ns"] = max(0, span)
            body["energy_reset"] = reset
            if not reset and span > 0:
                # Energy used over the outage proves the average power stayed under the
                # ceiling. The driver regulates power as an average and the counter and
                # the sample clock are read a moment apart, so a GPU running at its cap
                # reads a little either side of it: 5 % (at least the read-back
                # tolerance) is allowed, and recorded.
                avg = (sample.energy_mj - last.energy_mj) * 1_000_000_000 // span
                body["outage_avg_power_mw"] = avg
                if expected is not None:
                    slack = max(self.actuator.tolerance_mw, expected // 20)
                    body["outage_slack_mw"] = slack
                    held = held and avg <= expected + slack
            else:
                held = False  # a reset counter (or no time between readings) proves nothing
        if expected is not None:
            body["expected_mw"] = expected
        body["held"] = held
        with self.pipeline.lock:
            self.pipeline.writer.submit("recovery", body)
            self.state.faults.pop(minor, None)
        self.count("recovery")
        log.info("GPU %s: recovered, ceiling held=%s", minor, held)
        return True

    # -- thermal guard -------------------------------------------------------
    def _follow(self, kind: str, future: Future[ReceiptLike], minor: int,
                changed_ns: int) -> None:
        """Schedule the facility follow-up (path 3) once the action's PER is durable."""
        follow = self.pipeline.follow_up
        if follow is None:
            return
        job = self.state.owner_of(minor)

        def done(f: Future[ReceiptLike]) -> None:
            if f.exception() is None:
                follow(kind, f.result(), [minor], changed_ns, job)

        future.add_done_callback(done)

    def _thermal(self, minor: int, sample: Sample) -> None:
        settings = getattr(self.policy().settings, "thermal", None)
        if settings is None or not getattr(settings, "enabled", True):
            return
        threshold = int(settings.threshold_c) * 1000
        release = int(settings.release_c) * 1000
        with self.pipeline.lock:
            throttle = self.state.throttled.get(minor)
            governed = self.state.governed.get(minor)
            if throttle is None and sample.temp_mc >= threshold and governed is not None:
                if settings.throttle_watts:
                    to = int(settings.throttle_watts) * 1000
                else:
                    to = int(governed * float(settings.throttle_fraction or 0.7))
                low, _ = self.actuator.hw_range([minor])
                to = max(to, low)
                if to >= governed:
                    return
                changed_ns = time.time_ns()
                entry = self.actuator.apply(minor, to)
                body = self._body(minor, "automation:thermal", temp_mc=sample.temp_mc,
                                  threshold_mc=threshold, from_mw=governed, to_mw=to,
                                  readback_mw=entry.get("readback_mw"), ok=entry["ok"],
                                  paths={"telemetry": "ok", "policy": "allow",
                                         "facility": "pending", "ledger": "committed"})
                if "error" in entry:
                    body["error"] = entry["error"]
                future = self.pipeline.writer.submit("throttle", body)
                self._follow("throttle", future, minor, changed_ns)
                if "error" not in entry:
                    self.state.governed[minor] = to
                    self.state.throttled[minor] = Throttle(governed, to, future)
                self.count("throttle")
                log.warning("GPU %s: %s m°C ≥ %s, throttled %s → %s mW", minor,
                            sample.temp_mc, threshold, governed, to)
            elif throttle is not None and sample.temp_mc <= release:
                ref = throttle.ref.result(timeout=60)
                changed_ns = time.time_ns()
                entry = self.actuator.apply(minor, throttle.base_mw)
                body = self._body(minor, "automation:thermal", temp_mc=sample.temp_mc,
                                  threshold_mc=release, from_mw=throttle.to_mw,
                                  to_mw=throttle.base_mw, readback_mw=entry.get("readback_mw"),
                                  ok=entry["ok"], ref={"seq": ref.seq, "hash": ref.hash},
                                  paths={"telemetry": "ok", "policy": "allow",
                                         "facility": "pending", "ledger": "committed"})
                if "error" in entry:
                    body["error"] = entry["error"]
                self._follow("release", self.pipeline.writer.submit("release", body), minor,
                             changed_ns)
                if "error" not in entry:
                    self.state.governed[minor] = throttle.base_mw
                    del self.state.throttled[minor]
                self.count("release")
                log.info("GPU %s: %s m°C ≤ %s, released to %s mW", minor, sample.temp_mc,
                         release, throttle.base_mw)

    # -- drift ---------------------------------------------------------------
    def _cause(self, minor: int, limits: PowerLimits, sample: Sample, *,
               recovered: bool) -> tuple[str, bool]:
        """Why a limit moved (audits tell these apart) and whether the energy counter reset."""
        last = self._seen.get(minor)
        reset = last is not None and (sample.energy_epoch != last.energy_epoch
                                      or sample.energy_mj < last.energy_mj)
        if reset and limits.enforced_mw == limits.default_mw:
            return "driver-reload", reset
        return ("gpu-lost" if recovered else "out-of-band"), reset

    def _drift(self, minor: int, sample: Sample, recovered: bool) -> None:
        governed = self.state.governed.get(minor)
        if governed is None or self.actuator.agrees(governed, sample.enforced_mw):
            self.state.reported.pop(minor, None)
            return
        if self.state.reported.get(minor) == sample.enforced_mw:
            return  # already recorded this observation
        with self.pipeline.lock:
            governed = self.state.governed.get(minor)
            try:  # re-read under the lock: a prolog may have just moved it
                limits = self.actuator.gpu.limits(self.actuator.index(minor))
                sample = self.actuator.gpu.sample(self.actuator.index(minor))
            except GpuError:
                return
            observed = limits.enforced_mw
            if governed is None or self.actuator.agrees(governed, observed):
                return
            last = self._seen.get(minor)
            cause, reset = self._cause(minor, limits, sample, recovered=recovered)
            action = str(getattr(self.policy().settings, "drift", "reconcile"))
            if (cause == "out-of-band" and observed < governed
                    and self.actuator.agrees(governed, limits.requested_mw)):
                # Our limit is still the requested one; another limiter (the BMC, a
                # facility controller) holds the GPU lower. Setting ours again changes
                # nothing: record it once, and watch.
                cause, action = "lower-limiter", "observe"
            body = self._body(minor, "automation:drift", expected_mw=governed,
                              observed_mw=observed, cause=cause, action=action,
                              requested_mw=limits.requested_mw, energy_reset=reset,
                              energy_mj=sample.energy_mj, energy_epoch=sample.energy_epoch)
            if last is not None:
                body["last_seen"] = {"time_ns": last.time_ns, "energy_mj": last.energy_mj,
                                     "energy_epoch": last.energy_epoch}
            if action == "observe":
                self.state.reported[minor] = observed
            elif action == "reconcile":
                entry = self.actuator.apply(minor, governed)
                body["readback_mw"] = entry.get("readback_mw")
                body["ok"] = entry["ok"]
                if "error" in entry:
                    body["error"] = entry["error"]
                after = int(entry.get("readback_mw") or observed)
                if not entry["ok"] or not self.actuator.agrees(governed, after):
                    self.state.reported[minor] = after
            else:
                self.state.governed[minor] = observed
                throttle = self.state.throttled.pop(minor, None)
                if throttle is not None:
                    body["throttle_cleared"] = True
            self.pipeline.writer.submit("drift", body)
        self.count("drift")
        log.warning("GPU %s: drift %s → %s mW (%s), %s", minor, governed, observed, cause,
                    action)
