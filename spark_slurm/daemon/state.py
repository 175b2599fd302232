"""Governed state: the limit sparkd last set or accepted per GPU, and the jobs holding caps.

Two sources of truth survive a crash: the ledger (every governed value is in a
PER) and the restore-intent file, written atomically *before* any cap is set, so
a daemon killed mid-job still knows what to put back. `governed_from_records`
replays the ledger the same way every time (start-up, tests, audits).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.durable import replace_file

# PER kinds that change (or confirm) a GPU's governed limit.
GOVERNING_KINDS = ("cap", "restore", "reconcile", "drift", "throttle", "release", "executor")


@dataclass(slots=True)
class JobState:
    """A job holding caps on this node; `previous_mw` is what its epilog restores."""

    job_id: str
    uid: int | None
    user: str | None
    gpus: list[int]
    previous_mw: dict[int, int]
    start_energy_mj: dict[int, int]
    start_energy_epoch: dict[int, int]
    granted_mw: int
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    workload_class: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("previous_mw", "start_energy_mj", "start_energy_epoch"):
            data[key] = {str(k): v for k, v in data[key].items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobState:
        values = dict(data)
        for key in ("previous_mw", "start_energy_mj", "start_energy_epoch"):
            values[key] = {int(k): int(v) for k, v in values.get(key, {}).items()}
        return cls(**values)


@dataclass(slots=True)
class Throttle:
    """A thermal throttle in force: `base_mw` is what the release puts back."""

    base_mw: int
    to_mw: int
    ref: Any


@dataclass(slots=True)
class NodeState:
    """In-memory governed state; mutated only under the daemon's actuation lock."""

    governed: dict[int, int] = field(default_factory=dict)
    jobs: dict[str, JobState] = field(default_factory=dict)
    throttled: dict[int, Throttle] = field(default_factory=dict)
    reported: dict[int, int] = field(default_factory=dict)  # gpu -> observed mW already recorded
    ending: set[str] = field(default_factory=set)  # jobs whose restore is being committed
    faults: dict[int, Any] = field(default_factory=dict)  # gpu -> receipt of its fault PER

    def target(self, gpu: int, wanted_mw: int) -> int:
        """The limit to set for a governed value, honouring a thermal throttle in force."""
        throttle = self.throttled.get(gpu)
        if throttle is None:
            return wanted_mw
        throttle.base_mw = wanted_mw
        return min(wanted_mw, throttle.to_mw)

    def owner_of(self, gpu: int) -> str | None:
        for job in self.jobs.values():
            if gpu in job.gpus:
                return job.job_id
        return None


def governed_from_records(records: Iterable[Any]) -> dict[int, int]:
    """Each GPU's last governed limit (mW), replaying PER bodies in ledger order."""
    governed: dict[int, int] = {}
    for record in records:
        for gpu, mw in limits_set_by(record):
            governed[gpu] = mw
    return governed


def governed_latest(newest_first: Iterable[Any], gpus: Iterable[int]) -> dict[int, int]:
    """`governed_from_records` read from the head backwards, stopping once every GPU in
    `gpus` is settled: the same value for each of them, without replaying the whole
    ledger. Every start-up writes a `reconcile` PER naming each GPU's limit, so the
    walk ends at the latest start-up at the furthest (a GPU it could not read aside)."""
    wanted = set(gpus)
    governed: dict[int, int] = {}
    for record in newest_first:
        for gpu, mw in reversed(limits_set_by(record)):  # within a PER the last one wins
            governed.setdefault(gpu, mw)
        if wanted <= governed.keys():
            break
    return governed


def last_action(ledger: Any, job_id: str) -> Any:
    """The job's newest `cap` or `restore` PER on this ledger, or None: a `restore`
    there means the job's end is already recorded (through the job_id index)."""
    last = None
    for record in ledger.records(job_id=job_id, kinds=["cap", "restore"]):
        last = record
    return last


def limits_set_by(record: Any) -> list[tuple[int, int]]:
    """(GPU, governed mW) pairs one PER sets, in the order it sets them."""
    kind = record.kind
    if kind not in GOVERNING_KINDS:
        return []
    body = record.body
    if kind in ("cap", "restore", "reconcile"):
        return [(int(entry["index"]), int(entry["intended_mw"]))
                for entry in body.get("gpus", [])
                if "intended_mw" in entry and "error" not in entry]
    if kind == "executor":  # validate-only mode: what an external executor was seen to set
        return [(int(entry["index"]), int(entry["readback_mw"]))
                for entry in body.get("gpus", []) if entry.get("landed")]
    if kind == "drift":
        key = "expected_mw" if body.get("action") == "reconcile" else "observed_mw"
        return [(int(body["gpu"]), int(body[key]))]
    if "error" not in body:  # throttle, release
        return [(int(body["gpu"]), int(body["to_mw"]))]
    return []


class IntentStore:
    """Restore intents of running jobs: an append-only JSON Lines log, one fdatasync each.

    `begin` is durable before any cap is set; `end` is written once the restore PER
    is durable. `compact` (at start-up) rewrites the log atomically to what is live.
    A torn last line (a crash mid-write) is ignored: its cap was never set.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "intents.jsonl"
        self._fd: int | None = None

    def load(self) -> dict[str, JobState]:
        jobs: dict[str, JobState] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return jobs
        for line in data.split(b"\n"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the torn tail of a write that never finished
            if entry.get("op") == "begin":
                job = JobState.from_json(entry["job"])
                jobs[job.job_id] = job
            elif entry.get("op") == "end":
                jobs.pop(str(entry.get("job_id")), None)
        return jobs

    def _append(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.fchmod(self._fd, 0o600)
        # the leading newline ends a line a full disk tore, so this one parses whole
        data = b"\n" + json.dumps(entry, sort_keys=True).encode() + b"\n"
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"{self.path}: short write ({written} of {len(data)} "
                          "bytes): no space left")
        os.fdatasync(self._fd)

    def begin(self, job: JobState) -> None:
        """Durably note a job's restore targets (call before setting any cap)."""
        self._append({"op": "begin", "job": job.to_json()})

    def end(self, job_id: str) -> None:
        """The job's restore is recorded; its intent is no longer needed."""
        self._append({"op": "end", "job_id": job_id})

    def compact(self, jobs: dict[str, JobState]) -> None:
        """Replace the log with the live intents: write, fsync, rename, fsync the directory."""
        self.close()
        payload = b"".join(json.dumps({"op": "begin", "job": j.to_json()},
                                      sort_keys=True).encode() + b"\n" for j in jobs.values())
        replace_file(self.path, payload, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
