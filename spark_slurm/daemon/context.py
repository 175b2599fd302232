"""Path 2, job context: who the job is, what it asked for, and which GPUs it holds.

The hook passes what slurmd's environment knows; a pluggable job-context source
fills the rest (account, QOS, admin_comment token, GPUs). A source that fails
leaves the context `partial` and says why, rather than failing the prolog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from spark_slurm.daemon.contracts import JobContextSource
from spark_slurm.daemon.requests import Request
from spark_slurm.errors import JobNotFound

log = logging.getLogger("sparkd.context")

_TOKEN_INTS = ("v", "watts", "gpus", "wpg", "injected")


def parse_token(text: str | None) -> dict[str, Any] | None:
    """The admission token `spark:v=1,watts=..,...` from an admin_comment, if any."""
    if not text:
        return None
    for part in text.replace(";", " ").split():
        if not part.startswith("spark:"):
            continue
        fields: dict[str, Any] = {}
        for item in part[len("spark:"):].split(","):
            key, sep, value = item.partition("=")
            if not sep:
                continue
            if key in _TOKEN_INTS:
                try:
                    fields[key] = int(value)
                except ValueError:
                    continue
            else:
                fields[key] = value
        return fields
    return None


def class_from_comment(comment: str | None) -> str | None:
    """`--comment=spark:class=training` names the workload class."""
    token = parse_token(comment)
    if token is None:
        return None
    value = token.get("class")
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class JobFacts:
    """The merged context of one job on this node, recorded in every PER about it."""

    job_id: str
    user: str | None = None
    uid: int | None = None
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    workload_class: str | None = None
    gpus: tuple[int, ...] = ()
    node_mw: int | None = None
    token: dict[str, Any] | None = None
    state: str | None = None
    status: str = "ok"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": self.job_id, "gpus": list(self.gpus),
                               "status": self.status}
        for key in ("user", "uid", "account", "partition", "qos", "node_mw", "state"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.workload_class is not None:
            out["class"] = self.workload_class
        if self.token is not None:
            out["token"] = self.token
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def gather(request: Request, source: JobContextSource | None, node: str) -> JobFacts:
    """Merge the request with the job-context source; the request wins where both speak."""
    assert request.job_id is not None
    notes: list[str] = []
    ctx: Any = None
    if source is not None:
        try:
            ctx = source.get(request.job_id)
        except Exception as exc:  # any source failure degrades to a partial context
            notes.append(f"job context source: {exc}")
            log.warning("job %s: context source failed: %s", request.job_id, exc)

    def pick(name: str, ours: Any) -> Any:
        if ours is not None:
            return ours
        return getattr(ctx, name, None) if ctx is not None else None

    token = parse_token(getattr(ctx, "admin_comment", None)) if ctx is not None else None
    comment = request.comment if request.comment is not None else pick("comment", None)
    gpus: tuple[int, ...] = request.gpus or ()
    if not gpus and ctx is not None:
        node_gpus = getattr(ctx, "node_gpus", None) or {}
        gpus = tuple(node_gpus.get(request.node or node, ()))
        if not gpus and len(node_gpus) == 1:
            gpus = tuple(next(iter(node_gpus.values())))
    node_mw = request.node_mw
    if node_mw is None and token is not None and isinstance(token.get("watts"), int):
        node_mw = token["watts"] * 1000
    if node_mw is None and ctx is not None:
        watts = getattr(ctx, "gpupower_w_per_node", None)
        if isinstance(watts, int) and watts > 0:
            node_mw = watts * 1000
    workload_class = (request.workload_class or class_from_comment(comment)
                      or (token.get("class") if token else None)
                      or pick("workload_class", None))
    status = "ok" if (ctx is not None or source is None) and not notes else "partial"
    if source is None:
        notes.append("no job context source configured; request fields only")
        status = "partial"
    state = getattr(ctx, "state", None) if ctx is not None else None
    return JobFacts(
        job_id=request.job_id, user=pick("user", request.user), uid=pick("uid", request.uid),
        account=pick("account", request.account), partition=pick("partition", request.partition),
        qos=pick("qos", request.qos), workload_class=workload_class, gpus=gpus, node_mw=node_mw,
        token=token, state=str(state) if state is not None else None, status=status,
        notes=tuple(notes),
    )


def job_running(source: JobContextSource | None, job_id: str) -> bool | None:
    """Whether the scheduler still runs the job; None when it cannot say."""
    if source is None:
        return None
    try:
        ctx = source.get(job_id)
    except JobNotFound:
        return False
    except Exception:
        return None
    state = str(getattr(ctx, "state", "") or "").upper()
    if not state:
        return None
    return state in ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "PENDING")
