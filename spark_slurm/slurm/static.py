"""Fixed job contexts, for tests and the demo where no controller answers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spark_slurm.errors import ConfigError, JobNotFound
from spark_slurm.slurm.context import JobContext


def _context(job_id: str, raw: Any, where: str) -> JobContext:
    if not isinstance(raw, dict):
        raise ConfigError(f"job {job_id}: expected an object", where)
    try:
        node_gpus = {str(n): [int(i) for i in g] for n, g in raw.get("node_gpus", {}).items()}
        watts = raw.get("gpupower_w_per_node")
        return JobContext(
            job_id=job_id, user=str(raw["user"]), uid=int(raw["uid"]),
            account=raw.get("account"), partition=raw.get("partition"), qos=raw.get("qos"),
            comment=raw.get("comment"), admin_comment=raw.get("admin_comment"),
            node_gpus=node_gpus, gpupower_w_per_node=None if watts is None else int(watts),
            workload_class=raw.get("workload_class"), state=str(raw.get("state", "RUNNING")),
            gid=None if raw.get("gid") is None else int(raw["gid"]),
        )
    except KeyError as exc:
        raise ConfigError(f"job {job_id}: missing {exc.args[0]!r}", where) from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"job {job_id}: {exc}", where) from exc


class StaticSource:
    """`JobContextSource` over contexts given up front (or a JSON file of them)."""

    def __init__(self, contexts: Iterable[JobContext] = (), path: Path | str | None = None
                 ) -> None:
        self._jobs = {c.job_id: c for c in contexts}
        self.path = Path(path) if path is not None else None

    def add(self, ctx: JobContext) -> None:
        self._jobs[ctx.job_id] = ctx

    def get(self, job_id: str) -> JobContext:
        """The fixed context; a file given as `path` is re-read so demos can add jobs."""
        job_id = str(job_id)
        if job_id not in self._jobs and self.path is not None:
            self._jobs.update(load_contexts(self.path))
        if job_id not in self._jobs:
            raise JobNotFound(job_id)
        return self._jobs[job_id]


def load_contexts(path: Path) -> dict[str, JobContext]:
    """Read `{"JOBID": {"user": .., "uid": .., "node_gpus": {...}, ...}, ...}`."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError("static job contexts file not found", str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read static job contexts: {exc}", str(path)) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not JSON: {exc.msg}", str(path), exc.lineno, exc.colno) from exc
    if not isinstance(doc, dict):
        raise ConfigError("expected an object of job id -> context", str(path))
    return {str(k): _context(str(k), v, str(path)) for k, v in doc.items()}
