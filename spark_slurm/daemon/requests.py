"""The daemon's request model: one JSON object per line, checked field by field.

Anything that is not a well-formed request for a known op becomes `BadRequest`
naming the field and the problem, so the server can answer with a clear error
(and record a `reject` PER) instead of failing somewhere deeper.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from spark_slurm.errors import BadRequest

OPS = ("prolog", "epilog", "cap", "status", "ingest", "rotate-key", "intent")
_JOB_OPS = ("prolog", "epilog", "cap")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_FIELDS = {
    "op", "id", "job_id", "user", "uid", "gid", "partition", "account", "qos", "gpus", "watts",
    "watts_per_gpu", "comment", "node", "class", "reason",
    # intent (an external executor announces a limit it is about to set)
    "executor", "deadline_s",
    # written by spark-hook into its fallback journal, accepted on the socket too
    "journaled_ns", "hook_exit", "error",
}


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request; watts are converted to integer milliwatts here."""

    op: str
    id: str | int | None = None
    job_id: str | None = None
    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus: tuple[int, ...] | None = None
    node_mw: int | None = None
    per_gpu_mw: int | None = None
    comment: str | None = None
    node: str | None = None
    workload_class: str | None = None
    reason: str | None = None
    executor: str | None = None
    deadline_s: float | None = None

    def echo(self) -> dict[str, Any]:
        """The request's own fields as recorded in PERs (what the caller claimed)."""
        out: dict[str, Any] = {"op": self.op}
        for key in ("job_id", "user", "uid", "gid", "partition", "account", "qos", "comment",
                    "node", "reason", "executor"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.workload_class is not None:
            out["class"] = self.workload_class
        if self.gpus is not None:
            out["gpus"] = list(self.gpus)
        if self.node_mw is not None:
            out["node_mw"] = self.node_mw
        if self.per_gpu_mw is not None:
            out["per_gpu_mw"] = self.per_gpu_mw
        if self.deadline_s is not None:
            out["deadline_ms"] = round(self.deadline_s * 1000)
        return out


def _str(data: dict[str, Any], key: str, limit: int = 4096) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"field {key!r} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise BadRequest(f"field {key!r} is longer than {limit} characters")
    _unicode(value, key)
    return value


def _unicode(value: str, key: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which UTF-8 (and so a PER) refuses."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"field {key!r} holds an unpaired UTF-16 surrogate escape") from None


def _int(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {key!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(f"field {key!r} = {value} is outside {low}..{high}")
    return value


def _watts_mw(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"field {key!r} must be a number of watts, got {value!r}")
    # compare before any float conversion: a 4000-digit integer overflows a float
    if not 0 < value <= 1_000_000 or (isinstance(value, float) and not math.isfinite(value)):
        shown = str(value) if len(str(value)) <= 40 else f"a {len(str(value))}-digit number"
        raise BadRequest(f"field {key!r} = {shown} is not a usable number of watts")
    return round(value * 1000)


def parse_request(line: bytes) -> Request:
    """Parse and check one request line (without its newline)."""
    if not line.strip():
        raise BadRequest("empty request line (one JSON object per line is expected)")
    try:
        data = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("request is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON at column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # the C decoder recurses once per nesting level
        raise BadRequest("request is nested too deeply to be a request") from None
    except ValueError as exc:  # e.g. an integer past Python's int/str digit limit
        raise BadRequest(f"malformed JSON: {exc}") from None
    return request_from(data)


def request_from(data: Any) -> Request:
    """Check an already-decoded request object (socket line or journal entry)."""
    if not isinstance(data, dict):
        raise BadRequest("request must be a JSON object")
    op = data.get("op")
    if not isinstance(op, str):
        raise BadRequest("request has no string field 'op'")
    if op not in OPS:
        raise BadRequest(f"unknown op {op!r} (known: {', '.join(OPS)})")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} in {op} request")
    rid = data.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise BadRequest("field 'id' must be a string or an integer")
    if isinstance(rid, int) and not -(2**63) <= rid < 2**63:
        raise BadRequest("field 'id' is outside the 64-bit integer range")
    if isinstance(rid, str):
        if len(rid) > 256:
            raise BadRequest("field 'id' is longer than 256 characters")
        _unicode(rid, "id")
    job_id = data.get("job_id")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if job_id is not None and (not isinstance(job_id, str) or not job_id
                               or len(job_id) > 64 or not job_id.replace("_", "").isalnum()):
        raise BadRequest(f"field 'job_id' must be a Slurm job id, got {job_id!r}")
    if op in _JOB_OPS and job_id is None:
        raise BadRequest(f"{op} request needs 'job_id'")
    gpus_raw = data.get("gpus")
    gpus: tuple[int, ...] | None = None
    if gpus_raw is not None:
        if not isinstance(gpus_raw, list) or any(
                isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 4096
                for g in gpus_raw):
            raise BadRequest("field 'gpus' must be a list of GPU indices (integers)")
        if len(set(gpus_raw)) != len(gpus_raw):
            raise BadRequest("field 'gpus' names a GPU twice")
        gpus = tuple(gpus_raw)
    node_mw = _watts_mw(data, "watts")
    per_gpu_mw = _watts_mw(data, "watts_per_gpu")
    if op == "cap" and node_mw is None and per_gpu_mw is None:
        raise BadRequest("cap request needs 'watts_per_gpu' (or 'watts' for the node)")
    executor, deadline_s = _intent_fields(op, data, gpus, node_mw, per_gpu_mw)
    return Request(
        op=op, id=rid, job_id=job_id, user=_str(data, "user", 256),
        uid=_int(data, "uid", 0, 2**32 - 1), gid=_int(data, "gid", 0, 2**32 - 1),
        partition=_str(data, "partition", 256), account=_str(data, "account", 256),
        qos=_str(data, "qos", 256), gpus=gpus, node_mw=node_mw, per_gpu_mw=per_gpu_mw,
        comment=_str(data, "comment"), node=_str(data, "node", 256),
        workload_class=_str(data, "class", 64), reason=_str(data, "reason", 1024),
        executor=executor, deadline_s=deadline_s,
    )


def executor_name_ok(name: str) -> bool:
    """Executor names are short labels (recorded in PERs, shown in audits)."""
    return 0 < len(name) <= 64 and set(name) <= _NAME_CHARS


def _intent_fields(op: str, data: dict[str, Any], gpus: tuple[int, ...] | None,
                   node_mw: int | None, per_gpu_mw: int | None
                   ) -> tuple[str | None, float | None]:
    """`executor` and `deadline_s`, which only an intent may carry, checked."""
    executor = _str(data, "executor", 64)
    deadline = data.get("deadline_s")
    if op != "intent":
        for key in ("executor", "deadline_s"):
            if data.get(key) is not None:
                raise BadRequest(f"field {key!r} belongs to intent requests, not {op}")
        return None, None
    if executor is None:
        raise BadRequest("intent request needs 'executor' (the executor's name)")
    if not executor_name_ok(executor):
        raise BadRequest(f"field 'executor' = {executor!r} is not a name (letters, digits, "
                         "'.', '_', '-')")
    if not gpus:
        raise BadRequest("intent request needs 'gpus' (the GPUs the executor will set)")
    if node_mw is not None:
        raise BadRequest("intent request takes 'watts_per_gpu' (the limit each GPU gets), "
                         "not 'watts'")
    if per_gpu_mw is None:
        raise BadRequest("intent request needs 'watts_per_gpu'")
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) \
                or not math.isfinite(deadline) or not 0 < deadline <= 86400:
            raise BadRequest(f"field 'deadline_s' = {deadline!r} is not a number of seconds "
                             "in (0, 86400]")
        deadline = float(deadline)
    return executor, deadline
