"""Job context through pyslurm, when a pyslurm built for this Slurm imports.

pyslurm must match the Slurm major.minor exactly (PyPI has none for 22.05), so
this is optional: `open_context_source("auto")` falls back to scontrol. The job
object is read into the same fields the scontrol parser yields, so both sources
build contexts with one function and cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from spark_slurm.errors import JobNotFound, SlurmError
from spark_slurm.slurm.context import JobContext, build_context
from spark_slurm.slurm.hostlist import expand_hostlist


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ",".join(f"gres/{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def fields_from_job(job: Any) -> tuple[dict[str, str | None], dict[str, str]]:
    """Map a pyslurm (23.02+ API) `Job` to scontrol-style fields and per-node GRES."""
    uid = getattr(job, "user_id", None)
    gid = getattr(job, "group_id", None)
    fields: dict[str, str | None] = {
        "JobId": _text(getattr(job, "id", None)),
        "UserId": f"{_text(getattr(job, 'user_name', ''))}({uid})" if uid is not None else None,
        "GroupId": f"({gid})" if gid is not None else None,
        "Account": _text(getattr(job, "account", None)),
        "Partition": _text(getattr(job, "partition", None)),
        "QOS": _text(getattr(job, "qos", None)),
        "JobState": _text(getattr(job, "state", None)),
        "Comment": _text(getattr(job, "comment", None)),
        "AdminComment": _text(getattr(job, "admin_comment", None)),
        "TresPerNode": _text(getattr(job, "gres_per_node", None)),
    }
    node_gres: dict[str, str] = {}
    nodes = getattr(job, "nodes", None)
    details = getattr(job, "gres_detail", None)
    if nodes and isinstance(details, (list, tuple)):
        node_gres = dict(zip(expand_hostlist(str(nodes)), (str(d) for d in details),
                             strict=False))
    return fields, node_gres


class PyslurmSource:
    """`JobContextSource` over `pyslurm.Job.load`; SlurmError when pyslurm is unusable."""

    def __init__(self, **_ignored: Any) -> None:
        try:
            import pyslurm  # type: ignore[import-not-found]  # noqa: PLC0415 (optional)
        except ImportError as exc:   # absent, or built for another Slurm release
            raise SlurmError(f"job context source pyslurm: cannot import pyslurm ({exc}); "
                             "use source scontrol") from exc
        if not hasattr(pyslurm, "Job"):
            raise SlurmError("job context source pyslurm: pyslurm is older than the 23.02 "
                             "API (no pyslurm.Job); use source scontrol")
        self._pyslurm: Any = pyslurm

    def get(self, job_id: str) -> JobContext:
        try:
            job = self._pyslurm.Job.load(int(job_id))
        except ValueError as exc:
            raise SlurmError(f"job id {job_id!r}: not a number") from exc
        except Exception as exc:  # pyslurm raises RPCError for unknown jobs
            if "Invalid job id" in str(exc) or "not found" in str(exc).lower():
                raise JobNotFound(job_id) from exc
            raise SlurmError(f"pyslurm: job {job_id}: {exc}") from exc
        fields, node_gres = fields_from_job(job)
        return build_context(fields, node_gres, job_id)
