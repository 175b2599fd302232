"""A simulated external executor: announces an intent to sparkd, then sets the limit itself.

What DCGM, NVIDIA DPS or a site script does on a real node in validate-only
mode, done on a simulated fleet: ask sparkd (`intent`), then change the limit
out of band through the same path `sparkctl sim smi -pl` uses, never through
sparkd. A plan can also misbehave the ways real executors do — apply without
announcing, apply what was denied, apply another value, or never apply — so
tests and demo scenarios can drive every verdict sparkd records.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.daemon import client
from spark_slurm.gpu.sim import LimitChange, SimFleet

Announce = Callable[..., dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the executor does. `obey`: apply only when sparkd approved;
    `apply_watts`: set this instead of what was announced (a misbehaving tool)."""

    gpus: tuple[int, ...]
    watts: float
    name: str = "sim-executor"
    job_id: str | None = None
    announce: bool = True
    apply: bool = True
    obey: bool = True
    apply_watts: float | None = None
    delay_s: float = 0.0
    deadline_s: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened: sparkd's reply (None when not asked), and what was set."""

    reply: dict[str, Any] | None
    approved: bool | None
    applied: tuple[LimitChange, ...]
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"reply": self.reply, "approved": self.approved, "skipped": self.skipped,
                "applied": [{"gpu": c.device.index, "old_mw": c.old_mw, "new_mw": c.new_mw}
                            for c in self.applied]}


def run_executor(plan: Plan, fleet: SimFleet, socket_path: Path, *,
                 announce: Announce = client.intent,
                 sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Carry out a plan: announce (maybe), then set each GPU's limit out of band (maybe)."""
    reply: dict[str, Any] | None = None
    approved: bool | None = None
    if plan.announce:
        reply = announce(list(plan.gpus), plan.watts, plan.name, job_id=plan.job_id,
                         deadline_s=plan.deadline_s, socket_path=socket_path)
        approved = bool(reply.get("ok")) and reply.get("verdict") == "approve"
    if not plan.apply:
        return Outcome(reply, approved, (), "the plan does not apply the limit")
    if approved is False and plan.obey:
        return Outcome(reply, approved, (), "sparkd denied the intent; not applied")
    if plan.delay_s > 0:
        sleep(plan.delay_s)
    mw = round((plan.apply_watts if plan.apply_watts is not None else plan.watts) * 1000)
    changes: list[LimitChange] = []
    for gpu in plan.gpus:
        changes.extend(fleet.oob_set_limit(_fleet_index(fleet, gpu), mw))
    return Outcome(reply, approved, tuple(changes))


def _fleet_index(fleet: SimFleet, minor: int) -> int:
    """Plans name GPUs as Slurm and sparkd do (device minor); the fleet by position."""
    for dev in fleet.devices:
        if dev.minor == minor:
            return dev.index
    return minor  # let the fleet report the unknown GPU
