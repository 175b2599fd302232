"""Executor intents waiting to land: what an external executor said it will set, durably.

In validate-only mode sparkd never sets a limit itself. An executor (DCGM, a
site script, NVIDIA DPS) announces each change first; sparkd answers approve or
deny at once and then watches for the change to land. The intent's outcome is
one PER, written when every GPU has landed or the deadline passed. Until then
the intent lives here: an append-only JSON Lines file, one fdatasync per entry,
written before the approval is answered, so a sparkd restart keeps watching
(and a change made while it was down is still attributed to its intent).
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.daemon.contracts import ReceiptLike
from spark_slurm.durable import replace_file

# Verdicts of the `executor` PER (docs/executors.md).
VALIDATED = "validated"
DENIED_BUT_APPLIED = "denied-but-applied"
APPLIED_WITHOUT_INTENT = "applied-without-intent"
INTENT_EXPIRED = "intent-expired"
VERDICTS = (VALIDATED, DENIED_BUT_APPLIED, APPLIED_WITHOUT_INTENT, INTENT_EXPIRED)


def _ints(data: dict[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in data.items()}


def _strs(data: dict[int, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in data.items()}


@dataclass(slots=True)
class ExecutorIntent:
    """One announced (or, from a prolog/epilog, expected) change and what landed so far.

    `targets` maps each GPU (Slurm index) to the limit the executor will set;
    `landed` maps each GPU already seen at its target to the read-back, when and
    the telemetry then. `ref_future` is the receipt of the PER the intent follows
    up (a `reject` for a denied one, the `cap`/`restore` of an expectation): a
    future because the intent is registered before that PER is durable."""

    id: str
    source: str  # "announce" | "prolog" | "epilog"
    executor: dict[str, Any]
    requester: dict[str, Any]
    authority: str
    job_id: str | None
    targets: dict[int, int]
    approved: bool
    decision: dict[str, Any]
    context: dict[str, Any]
    created_ns: int
    deadline_ns: int
    before: dict[int, dict[str, Any]] = field(default_factory=dict)
    previous: dict[int, int | None] = field(default_factory=dict)
    request: dict[str, Any] | None = None
    ref: dict[str, Any] | None = None
    landed: dict[int, dict[str, Any]] = field(default_factory=dict)
    ref_future: Future[ReceiptLike] | None = None

    @property
    def complete(self) -> bool:
        return set(self.landed) >= set(self.targets)

    def resolved_ref(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """{seq, hash} of the PER this intent follows up, once it is durable."""
        if self.ref is None and self.ref_future is not None:
            receipt = self.ref_future.result(timeout=timeout_s)
            self.ref = {"seq": receipt.seq, "hash": receipt.hash}
        return self.ref

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "executor": self.executor,
                "requester": self.requester, "authority": self.authority,
                "job_id": self.job_id, "targets": _strs(self.targets),
                "approved": self.approved, "decision": self.decision, "context": self.context,
                "created_ns": self.created_ns, "deadline_ns": self.deadline_ns,
                "before": _strs(self.before), "previous": _strs(self.previous),
                "request": self.request, "ref": self.ref}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecutorIntent:
        return cls(id=str(data["id"]), source=str(data["source"]),
                   executor=dict(data["executor"]), requester=dict(data["requester"]),
                   authority=str(data["authority"]), job_id=data.get("job_id"),
                   targets={g: int(v) for g, v in _ints(data["targets"]).items()},
                   approved=bool(data["approved"]), decision=dict(data["decision"]),
                   context=dict(data.get("context") or {}),
                   created_ns=int(data["created_ns"]), deadline_ns=int(data["deadline_ns"]),
                   before=_ints(data.get("before") or {}),
                   previous=_ints(data.get("previous") or {}), request=data.get("request"),
                   ref=data.get("ref"))


class PendingIntents:
    """`state_dir/executor-intents.jsonl`: add (before the reply), ref, done (after the
    outcome PER is durable). A torn last line is ignored: its approval was never sent."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "executor-intents.jsonl"
        self._fd: int | None = None
        self._lock = threading.Lock()  # `done` runs on the ledger writer's thread
        self.appended = 0  # lines written since the file was last rewritten

    def load(self) -> dict[str, ExecutorIntent]:
        out: dict[str, ExecutorIntent] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return out
        for line in data.split(b"\n"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            op = entry.get("op")
            if op == "add":
                intent = ExecutorIntent.from_json(entry["intent"])
                out[intent.id] = intent
            elif op == "ref" and entry.get("id") in out:
                out[entry["id"]].ref = entry.get("ref")
            elif op == "executor" and entry.get("id") in out:
                out[entry["id"]].executor = dict(entry.get("executor") or {})
            elif op == "done":
                out.pop(str(entry.get("id")), None)
        return out

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True).encode() + b"\n"
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(self._fd, line)
            os.fdatasync(self._fd)
            self.appended += 1

    def add(self, intent: ExecutorIntent) -> None:
        self._append({"op": "add", "intent": intent.to_json()})

    def set_ref(self, intent_id: str, ref: dict[str, Any]) -> None:
        self._append({"op": "ref", "id": intent_id, "ref": ref})

    def set_executor(self, intent_id: str, executor: dict[str, Any]) -> None:
        """An announcement joined a prolog/epilog expectation: who will act is now known."""
        self._append({"op": "executor", "id": intent_id, "executor": executor})

    def done(self, intent_id: str) -> None:
        self._append({"op": "done", "id": intent_id})

    def compact(self, live: dict[str, ExecutorIntent]) -> None:
        """Rewrite the file to the live intents only (at start-up, and when idle)."""
        payload = b"".join(json.dumps({"op": "add", "intent": i.to_json()},
                                      sort_keys=True).encode() + b"\n" for i in live.values())
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            replace_file(self.path, payload, 0o600)
            self.appended = len(live)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
