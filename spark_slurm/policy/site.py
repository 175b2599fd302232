"""`Policy`: one loaded policy file, its exact bytes' hash, and the questions asked of it.

The hash is over the file's bytes as read, and the text is kept verbatim, so the
ledger's `policy` PER lets anyone re-evaluate a recorded decision later with
`Policy.from_text(snapshot["text"])` and get the same answer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from spark_slurm.errors import PolicyError
from spark_slurm.policy.evaluate import evaluate
from spark_slurm.policy.loader import read_policy
from spark_slurm.policy.model import (
    AdmissionSettings,
    Decision,
    FacilitySettings,
    GpuSettings,
    PolicyData,
    PowerRequest,
    ThermalSettings,
)


class Policy:
    """A checked site policy; build it with `load` or `from_text`, never half-valid."""

    def __init__(self, data: PolicyData, text: str, sha256: str, source: str) -> None:
        self.data = data
        self.text = text
        self.sha256 = sha256
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read and check a policy file; PolicyError (a ConfigError) lists every problem."""
        where = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise PolicyError(where, [(1, 1, f"cannot read policy: {exc.strerror or exc}")]) \
                from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise PolicyError(where, [(line, column, "policy is not valid UTF-8")]) from exc
        return cls._build(text, hashlib.sha256(raw).hexdigest(), where)

    @classmethod
    def from_text(cls, text: str, source: str = "<policy>") -> Policy:
        """Check policy text (e.g. a ledger snapshot); the hash is over its UTF-8 bytes."""
        return cls._build(text, hashlib.sha256(text.encode("utf-8")).hexdigest(), source)

    @classmethod
    def _build(cls, text: str, sha256: str, source: str) -> Policy:
        data, problems = read_policy(text)
        if data is None:
            raise PolicyError(source, problems)
        return cls(data, text, sha256, source)

    def evaluate(self, request: PowerRequest) -> Decision:
        """Decide one request (never raises; malformed requests are denied)."""
        return evaluate(self.data, self.sha256, request)

    def snapshot_body(self) -> dict[str, Any]:
        """The body of the ledger's `policy` PER: hash, verbatim text and where it came from."""
        return {"v": 1, "sha256": self.sha256, "text": self.text, "path": self.source}

    def summary(self) -> dict[str, Any]:
        """Counts and key settings, for `sparkctl policy check`."""
        d = self.data
        return {
            "path": self.source, "sha256": self.sha256,
            "rules": len(d.rules), "tenants": len(d.tenants), "partitions": len(d.partitions),
            "qos": len(d.qos), "classes": len(d.classes),
            "default_watts_per_gpu": d.gpu.default_watts,
            "min_watts_per_gpu": d.gpu.min_watts, "max_watts_per_gpu": d.gpu.max_watts,
            "drift": d.drift, "on_daemon_down": d.on_daemon_down,
            "fail_mode": d.admission.fail_mode,
        }

    @property
    def gpu(self) -> GpuSettings:
        return self.data.gpu

    @property
    def default_watts_per_gpu(self) -> int:
        return self.data.gpu.default_watts

    @property
    def thermal(self) -> ThermalSettings:
        return self.data.thermal

    @property
    def drift(self) -> Literal["reconcile", "record"]:
        return self.data.drift

    @property
    def on_daemon_down(self) -> Literal["fail_open", "fail_closed"]:
        return self.data.on_daemon_down

    @property
    def facility(self) -> FacilitySettings:
        return self.data.facility

    @property
    def admission(self) -> AdmissionSettings:
        return self.data.admission

    @property
    def admin_group(self) -> str:
        return self.data.admin_group

    @property
    def owner_may(self) -> Literal["lower", "none", "any"]:
        return self.data.owner_may

    @property
    def settings(self) -> PolicyData:
        """Everything at once (architecture.md's `pol.settings`)."""
        return self.data


def reload_policy(current: Policy, path: str | Path) -> tuple[Policy, PolicyError | None]:
    """Re-read `path` for a running daemon: the new policy, or the current one and why not."""
    try:
        return Policy.load(path), None
    except PolicyError as exc:
        return current, exc
