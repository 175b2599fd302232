"""Who a job is and what it asked for: the daemon's workload-context path.

A `JobContext` is built from the controller's view of the job (Slurm's prolog
environment lacks the GPU indices and the power request on 22.05), by one of
several sources behind the `JobContextSource` protocol, chosen by name:
`pyslurm` (when it imports), `scontrol` (always works), `static` (tests, demo),
or `auto` (pyslurm if importable, else scontrol).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spark_slurm.errors import InputError, SlurmError, SlurmParseError
from spark_slurm.slurm.admin_token import AdminToken, comment_class, parse_admin_token
from spark_slurm.slurm.gres import parse_gres, parse_gres_alloc, total


@dataclass(frozen=True, slots=True)
class JobContext:
    """The scheduler's facts about one job, as the daemon records them in PERs."""

    job_id: str
    user: str
    uid: int
    account: str | None
    partition: str | None
    qos: str | None
    comment: str | None
    admin_comment: str | None
    node_gpus: dict[str, list[int]] = field(default_factory=dict)
    gpupower_w_per_node: int | None = None
    workload_class: str | None = None
    state: str = "UNKNOWN"
    gid: int | None = None
    token: AdminToken | None = None

    def gpus_on(self, node: str) -> list[int]:
        """The Slurm GPU indices allocated to this job on `node` (empty if none)."""
        return list(self.node_gpus.get(node, []))

    def as_record(self) -> dict[str, Any]:
        """The PER `context` object: integers and strings only, no empty noise."""
        out: dict[str, Any] = {"job_id": self.job_id, "user": self.user, "uid": self.uid,
                               "state": self.state,
                               "node_gpus": {n: list(g) for n, g in self.node_gpus.items()}}
        for key in ("account", "partition", "qos", "workload_class", "gpupower_w_per_node",
                    "gid"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class JobContextSource(Protocol):
    def get(self, job_id: str) -> JobContext:
        """The job's context; JobNotFound when Slurm does not know it."""
        ...


def _none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value in ("", "(null)", "N/A") else value


def _user_uid(text: str | None, field_name: str) -> tuple[str, int | None]:
    """`root(0)` -> ("root", 0); a bare name or a bare number also works."""
    value = _none(text)
    if value is None:
        return "", None
    if value.endswith(")") and "(" in value:
        name, _, num = value[:-1].rpartition("(")
        if not num.isdigit():
            raise SlurmParseError(field_name, value, "id in parentheses is not a number")
        return name, int(num)
    if value.isdigit():
        return value, int(value)
    return value, None


def build_context(fields: Mapping[str, str | None], node_gres: Mapping[str, str],
                  job_id: str) -> JobContext:
    """Assemble a JobContext from scontrol-style fields and per-node `GRES=` strings.

    The node watts come from what Slurm allocated on a node (`gpupower(CNT:N)`),
    else the request (`TresPerNode`, `JOB_GRES`), else the admission token.
    """
    user, uid = _user_uid(fields.get("UserId"), "UserId")
    group, gid = _user_uid(fields.get("GroupId"), "GroupId")
    del group
    if uid is None:
        raise SlurmParseError("UserId", str(fields.get("UserId")), "no numeric uid")
    node_gpus: dict[str, list[int]] = {}
    alloc_watts: list[int] = []
    for node, text in node_gres.items():
        for alloc in parse_gres_alloc(text):
            if alloc.name == "gpu":
                node_gpus.setdefault(node, []).extend(alloc.indices)
            elif alloc.name == "gpupower":
                alloc_watts.append(alloc.count)
    node_gpus = {node: sorted(set(idx)) for node, idx in node_gpus.items()}
    admin = _none(fields.get("AdminComment"))
    comment = _none(fields.get("Comment"))
    token = parse_admin_token(admin)
    watts: int | None = max(alloc_watts) if alloc_watts else None
    if watts is None:
        watts = total(parse_gres(_none(fields.get("TresPerNode")), "TresPerNode"), "gpupower")
    if watts is None:
        watts = total(parse_gres(_none(fields.get("JOB_GRES")), "JOB_GRES"), "gpupower")
    if watts is None and token is not None:
        watts = token.watts
    wclass = token.workload_class if token and token.workload_class else comment_class(comment)
    state = _none(fields.get("JobState")) or "UNKNOWN"
    return JobContext(
        job_id=_none(fields.get("JobId")) or job_id, user=user, uid=uid,
        account=_none(fields.get("Account")), partition=_none(fields.get("Partition")),
        qos=_none(fields.get("QOS")), comment=comment, admin_comment=admin,
        node_gpus=node_gpus, gpupower_w_per_node=watts, workload_class=wclass,
        state=state, gid=gid, token=token,
    )


def _open_scontrol(**kwargs: Any) -> JobContextSource:
    from spark_slurm.slurm.scontrol import ScontrolSource  # noqa: PLC0415 (imports context)
    return ScontrolSource(**kwargs)


def _open_pyslurm(**kwargs: Any) -> JobContextSource:
    from spark_slurm.slurm.pyslurm_source import PyslurmSource  # noqa: PLC0415 (imports context)
    return PyslurmSource(**kwargs)


def _open_static(**kwargs: Any) -> JobContextSource:
    from spark_slurm.slurm.static import StaticSource  # noqa: PLC0415 (imports context)
    return StaticSource(**kwargs)


def _open_auto(**kwargs: Any) -> JobContextSource:
    if importlib.util.find_spec("pyslurm") is not None:
        try:
            return _open_pyslurm(**{k: v for k, v in kwargs.items() if k != "runner"})
        except SlurmError:
            pass   # installed but built for another Slurm: use scontrol
    return _open_scontrol(**kwargs)


SOURCES: dict[str, Callable[..., JobContextSource]] = {
    "scontrol": _open_scontrol,
    "pyslurm": _open_pyslurm,
    "static": _open_static,
    "auto": _open_auto,
}


def open_context_source(name: str, **kwargs: Any) -> JobContextSource:
    """Open a job-context source by name (`scontrol`, `pyslurm`, `static`, `auto`)."""
    factory = SOURCES.get(name)
    if factory is None:
        raise InputError(f"unknown job context source {name!r} "
                         f"(choose from {', '.join(sorted(SOURCES))})")
    return factory(**kwargs)
