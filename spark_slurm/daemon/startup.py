"""Start-up: make the GPUs agree with the ledger before the socket opens.

The ledger's last governed value per GPU is the truth. Jobs with a restore
intent that ended while the daemon was down get their GPUs restored (a `restore`
PER each, authority automation:startup); jobs still running keep their caps.
Then every GPU's enforced limit is compared with the governed value and put
back where it differs. One `reconcile` PER lists every GPU and the orphans, and
also becomes the governed baseline of GPUs the ledger never governed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spark_slurm.daemon.actuation import Actuator, energy_between
from spark_slurm.daemon.context import job_running
from spark_slurm.daemon.contracts import JobContextSource, LedgerLike, PolicyLike
from spark_slurm.daemon.state import (
    GOVERNING_KINDS,
    IntentStore,
    JobState,
    NodeState,
    governed_latest,
)
from spark_slurm.errors import GpuError

log = logging.getLogger("sparkd.startup")

_REQUESTER = {"uid": 0, "user": "sparkd", "role": "automation"}


@dataclass(frozen=True, slots=True)
class StartupReport:
    """What start-up found and did (logged, and shown by `status`)."""

    governed: dict[int, int]
    orphans: list[str]
    kept: list[str]
    reconciled: list[int]


def record_policy(ledger: LedgerLike, policy: PolicyLike, path: str) -> bool:
    """Append a `policy` PER when the loaded policy differs from the last recorded one."""
    newest = next(ledger.records_newest_first(kinds=["policy"]), None)
    last = None if newest is None else newest.body.get("sha256")
    if last == policy.sha256:
        return False
    ledger.append_many([("policy", {"v": 1, "sha256": policy.sha256, "text": policy.text,
                                    "path": path})])
    return True


def _restored(ledger: LedgerLike, job_id: str) -> bool:
    """Whether the job's last cap was already followed by a committed restore."""
    last_kind = None
    for record in ledger.records(job_id=job_id, kinds=["cap", "restore"]):
        last_kind = record.kind
    return last_kind == "restore"


def reconcile_at_start(*, node: str, ledger: LedgerLike, actuator: Actuator,
                       intents: IntentStore, state: NodeState,
                       source: JobContextSource | None,
                       external: Callable[[int], bool] = lambda _gpu: False) -> StartupReport:
    """Restore orphans, align every GPU with the ledger, record it; fills `state`.

    `external` GPUs (validate-only mode) are never set: their entries only observe,
    keeping the ledger's value as governed, so the monitor's first look judges any
    change made while sparkd was down (an executor intent's landing, or not)."""
    governed = governed_latest(ledger.records_newest_first(kinds=list(GOVERNING_KINDS)),
                               actuator.devices)
    jobs = intents.load()
    orphans: list[str] = []
    kept: list[str] = []
    batch: list[tuple[str, dict[str, Any]]] = []
    for job_id, job in sorted(jobs.items()):
        if _restored(ledger, job_id):
            orphans.append(job_id)
            continue  # restore is durable; only the intent file was left behind
        running = job_running(source, job_id)
        if running:
            kept.append(job_id)
            continue
        entries = _restore_job(actuator, job, external)
        for e in entries:
            if "error" not in e:
                governed[e["index"]] = e["intended_mw"]
        batch.append(("restore", {
            "v": 1, "node": node, "job_id": job_id, "source": "automation",
            "authority": "automation:startup", "requester": _REQUESTER, "op": "epilog",
            "gpus": entries, "energy_mj": sum(e.get("energy_mj", 0) for e in entries),
            "energy_known": True,
            "reason": "job ended while sparkd was down" if running is False
            else "job state unknown to the job-context source; restored to be safe",
            "paths": {"telemetry": "ok", "context": "partial", "facility": "pending",
                      "policy": "allow", "ledger": "committed"}}))
        orphans.append(job_id)
    state.jobs = {j: jobs[j] for j in kept}
    for job in state.jobs.values():  # a `cap` since the prolog changed the grant
        grants = [governed[g] for g in job.gpus if g in governed]
        if grants:
            job.granted_mw = grants[0]
    entries = []
    reconciled = []
    for minor in sorted(actuator.devices):
        entry: dict[str, Any] = {"index": minor, "uuid": actuator.devices[minor].uuid}
        try:
            observed = actuator.gpu.limits(actuator.index(minor)).enforced_mw
        except GpuError as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entries.append(entry)
            continue
        expected = governed.get(minor)
        entry["observed_mw"] = observed
        if external(minor) and expected is not None and expected != observed:
            entry.update(expected_mw=expected, intended_mw=expected, action="observe")
        elif expected is None:
            entry.update(intended_mw=observed, readback_mw=observed, ok=True, action="baseline")
        elif expected == observed:
            entry.update(expected_mw=expected, intended_mw=expected, readback_mw=observed,
                         ok=True, action="none")
        else:
            applied = actuator.apply(minor, expected)
            entry.update(applied, expected_mw=expected, action="restore")
            reconciled.append(minor)
        if "error" not in entry:
            governed[minor] = entry["intended_mw"]
        entries.append(entry)
    batch.append(("reconcile", {"v": 1, "node": node, "source": "automation",
                                "authority": "automation:startup", "requester": _REQUESTER,
                                "gpus": entries, "orphans": orphans, "kept": kept}))
    ledger.append_many(batch)
    intents.compact(state.jobs)  # orphans' intents go only once their restores are durable
    state.governed = governed
    report = StartupReport(governed, orphans, kept, reconciled)
    log.info("start-up: %d GPUs, orphans restored %s, jobs kept %s, limits restored %s",
             len(entries), orphans, kept, reconciled)
    return report


def _restore_job(actuator: Actuator, job: JobState,
                 external: Callable[[int], bool]) -> list[dict[str, Any]]:
    entries = []
    for g in job.gpus:
        target = job.previous_mw.get(g)
        if target is None or not actuator.known(g) or external(g):
            continue  # an external executor restores validate-only GPUs
        before, _, _ = actuator.before(g)
        entry = actuator.apply(g, target)
        entry["before"] = before
        entry["previous_mw"] = target
        try:
            energy = energy_between(job.start_energy_mj.get(g, 0),
                                    job.start_energy_epoch.get(g, 0), actuator.sample(g))
            entry["energy_mj"] = energy.energy_mj
            entry["energy_reset"] = energy.reset
        except GpuError as exc:
            entry["energy_error"] = f"{type(exc).__name__}: {exc}"
        entries.append(entry)
    return entries
