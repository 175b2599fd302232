"""Job context from `scontrol show job -d`, the source that works on every Slurm.

Uses `scontrol --json` when the installed Slurm offers it (23.02+ builds with the
data_parser plugin) and the `key=value` text otherwise (22.05 on Debian 12).
The text has free-form values (`JobName=`, `Comment=`) that may contain spaces
and even `word=value`, so such a value only ends at a *known* Slurm key. Results
are cached for a short TTL: prolog and the daemon's follow-ups ask in bursts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import JobNotFound, SlurmCommandFailed, SlurmParseError
from spark_slurm.slurm.context import JobContext, build_context
from spark_slurm.slurm.hostlist import expand_hostlist
from spark_slurm.slurm.runner import Runner, SubprocessRunner

# Values that may hold spaces or `x=y`; they end only where a known key starts.
FREE_TEXT = frozenset({
    "JobName", "Comment", "AdminComment", "SystemComment", "Command", "WorkDir",
    "StdErr", "StdIn", "StdOut", "Reason", "Features", "Extra", "MailUser",
    "Container", "Prefer", "Licenses", "Network",
})
KNOWN_KEYS = FREE_TEXT | frozenset({
    "JobId", "ArrayJobId", "ArrayTaskId", "ArrayTaskThrottle", "HetJobId", "HetJobOffset",
    "HetJobIdSet", "UserId", "GroupId", "MCS_label", "Priority", "Nice", "Account", "QOS",
    "JobState", "Dependency", "Requeue", "Restarts", "BatchFlag", "Reboot", "ExitCode",
    "DerivedExitCode", "RunTime", "TimeLimit", "TimeMin", "SubmitTime", "EligibleTime",
    "AccrueTime", "StartTime", "EndTime", "Deadline", "SuspendTime", "SecsPreSuspend",
    "LastSchedEval", "Scheduler", "PreemptEligibleTime", "PreemptTime", "ResizeTime",
    "Partition", "AllocNode:Sid", "ReqNodeList", "ExcNodeList", "NodeList", "SchedNodeList",
    "BatchHost", "NumNodes", "NumCPUs", "NumTasks", "CPUs/Task", "ReqB:S:C:T", "ReqTRES",
    "AllocTRES", "TRES", "Socks/Node", "NtasksPerN:B:S:C", "CoreSpec", "JOB_GRES", "Nodes",
    "CPU_IDs", "Mem", "GRES", "MinCPUsNode", "MinMemoryNode", "MinMemoryCPU",
    "MinTmpDiskNode", "DelayBoot", "OverSubscribe", "Contiguous", "LicensesAlloc", "Power",
    "TresPerNode", "TresPerJob", "TresPerTask", "TresPerSocket", "CpusPerTres", "MemPerTres",
    "TresBind", "TresFreq", "MailType", "Reservation", "ContainerID", "CronJob",
    "CrontabSpec", "NtasksPerTRES", "Gres", "Shared", "ResvPort", "KillOInInvalidDependent",
    "SegmentSize",
})
# In the multi-line layout these own the rest of their line, whatever it holds, so a
# user's `--comment` cannot smuggle in `AdminComment=` or any other field.
LINE_KEYS = frozenset({"JobName", "Comment", "AdminComment", "SystemComment", "Command",
                       "WorkDir", "StdErr", "StdIn", "StdOut"})
_KEY = re.compile(r"(?:(?<=\s)|^)([A-Za-z_][A-Za-z0-9_:/]*)=")
_NODE_KEYS = ("CPU_IDs", "Mem", "GRES")
_NOT_FOUND = ("Invalid job id", "invalid job id", "not found")
_JOB_ID = re.compile(r"^\d+(?:_\d+|\+\d+)?$")


@dataclass
class ShowJob:
    """One job's fields from `scontrol show job -d`, and its per-node `GRES=`."""

    fields: dict[str, str] = field(default_factory=dict)
    node_gres: dict[str, str] = field(default_factory=dict)


def _tokens(line: str, multiline: bool) -> list[tuple[str, str]]:
    """Split one line into (key, value) pairs, keeping free-text values whole."""
    starts = [(m.start(), m.end(), m.group(1)) for m in _KEY.finditer(line)]
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(starts):
        _, vstart, key = starts[i]
        j = i + 1
        if multiline and key in LINE_KEYS:
            j = len(starts)
        elif key in FREE_TEXT:
            while j < len(starts) and starts[j][2] not in KNOWN_KEYS:
                j += 1
        end = starts[j][0] if j < len(starts) else len(line)
        pairs.append((key, line[vstart:end].strip()))
        i = j
    return pairs


def parse_show_job(text: str) -> list[ShowJob]:
    """Parse `scontrol show job [-d] [-o]` output (one or many jobs, either layout).

    The multi-line layout is the safer one (free text ends at the end of its
    line); with `-o` a free-text value ends at the next known Slurm key.
    """
    records: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("JobId="):
            records.append([])
        if not records:
            raise SlurmParseError("scontrol show job", line, "output does not start with JobId=")
        records[-1].append(line)
    return [_parse_record(lines) for lines in records]


def _parse_record(lines: list[str]) -> ShowJob:
    job = ShowJob()
    group: list[str] = []
    multiline = len(lines) > 1
    for line in lines:
        for key, value in _tokens(line, multiline):
            if key == "Nodes":
                group = expand_hostlist(value) if value not in ("", "(null)") else []
            elif key in _NODE_KEYS and group:
                if key == "GRES":
                    for node in group:
                        job.node_gres[node] = value
            else:
                job.fields.setdefault(key, value)
    return job


def parse_json_jobs(text: str) -> list[ShowJob]:
    """Parse `scontrol --json show job -d` into the same shape as the text parser."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SlurmParseError("scontrol --json", text, f"not JSON ({exc.msg})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise SlurmParseError("scontrol --json", text, "no 'jobs' list")
    return [_json_job(job) for job in doc["jobs"] if isinstance(job, dict)]


def _scalar(value: Any) -> str | None:
    """JSON values vary by Slurm version: plain, `{"set":..,"number":..}`, or lists."""
    if isinstance(value, dict):
        if value.get("set") is False:
            return None
        value = value.get("number", value.get("name"))
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else None
    if value is None or value == "":
        return None
    return str(value)


def _json_job(job: Mapping[str, Any]) -> ShowJob:
    user, uid = _scalar(job.get("user_name")) or "", _scalar(job.get("user_id"))
    gid = _scalar(job.get("group_id"))
    fields = {
        "JobId": _scalar(job.get("job_id")) or "",
        "UserId": f"{user}({uid})" if uid is not None else user,
        "GroupId": f"({gid})" if gid is not None else "",
        "Account": _scalar(job.get("account")) or "",
        "Partition": _scalar(job.get("partition")) or "",
        "QOS": _scalar(job.get("qos")) or "",
        "JobState": (_scalar(job.get("job_state")) or "").split(",")[0],
        "Comment": _scalar(job.get("comment")) or "",
        "AdminComment": _scalar(job.get("admin_comment")) or "",
        "TresPerNode": _scalar(job.get("tres_per_node")) or "",
    }
    nodes = _scalar(job.get("nodes"))
    details = job.get("gres_detail") or []
    node_gres: dict[str, str] = {}
    if nodes and isinstance(details, list):
        names = expand_hostlist(nodes)
        node_gres = {n: str(d) for n, d in zip(names, details, strict=False) if d}
    return ShowJob({k: v for k, v in fields.items() if v}, node_gres)


class ScontrolSource:
    """`JobContextSource` over `scontrol`, with a short per-job cache."""

    def __init__(self, runner: Runner | None = None, *, ttl_s: float = 2.0,
                 clock: Clock = SYSTEM_CLOCK, scontrol: str = "scontrol",
                 use_json: bool | None = None, timeout_s: float = 5.0) -> None:
        self.runner: Runner = runner if runner is not None else SubprocessRunner()
        self.ttl_ns = int(ttl_s * 1e9)
        self.clock = clock
        self.scontrol = scontrol
        self.use_json = use_json          # None: try once, remember the answer
        self.timeout_s = timeout_s
        self._cache: dict[str, tuple[int, JobContext]] = {}

    def invalidate(self, job_id: str | None = None) -> None:
        """Forget one job (or all), e.g. after an epilog."""
        if job_id is None:
            self._cache.clear()
        else:
            self._cache.pop(job_id, None)

    def get(self, job_id: str) -> JobContext:
        job_id = str(job_id).strip()
        if not _JOB_ID.match(job_id):
            raise SlurmParseError("job id", job_id, "expected digits (or ID_TASK / ID+OFFSET)")
        now = self.clock.monotonic_ns()
        hit = self._cache.get(job_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        shown = self._show(job_id)
        ctx = build_context(shown.fields, shown.node_gres, job_id)
        self._cache[job_id] = (now + self.ttl_ns, ctx)
        if len(self._cache) > 4096:     # a daemon lives for months: bound the cache
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return ctx

    def _show(self, job_id: str) -> ShowJob:
        if self.use_json is not False:
            argv = [self.scontrol, "--json", "show", "job", "-d", job_id]
            res = self.runner.run(argv, self.timeout_s)
            self._raise_not_found(job_id, res.returncode, res.stderr + res.stdout[:200])
            if res.returncode == 0 and res.stdout.lstrip().startswith("{"):
                self.use_json = True
                return self._pick(job_id, parse_json_jobs(res.stdout))
            if self.use_json:
                raise SlurmCommandFailed(argv, f"exited {res.returncode}", res.stderr)
            self.use_json = False
        argv = [self.scontrol, "show", "job", "-d", job_id]
        res = self.runner.run(argv, self.timeout_s)
        self._raise_not_found(job_id, res.returncode, res.stderr)
        if res.returncode != 0:
            raise SlurmCommandFailed(argv, f"exited {res.returncode}", res.stderr)
        return self._pick(job_id, parse_show_job(res.stdout))

    @staticmethod
    def _raise_not_found(job_id: str, returncode: int, text: str) -> None:
        if returncode != 0 and any(s in text for s in _NOT_FOUND):
            raise JobNotFound(job_id)

    @staticmethod
    def _pick(job_id: str, jobs: list[ShowJob]) -> ShowJob:
        for job in jobs:
            if job.fields.get("JobId") == job_id:
                return job
        if len(jobs) == 1:          # array/het ids print the underlying id
            return jobs[0]
        raise JobNotFound(job_id)
