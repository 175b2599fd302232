"""Compiles the admission part of a policy into a Lua 5.1 table for job_submit.lua.

slurmctld runs the submit plugin under its locks, so the plugin must not parse
YAML or read config: it `dofile`s this chunk once at load. Only what admission
needs is emitted (limits, ordered rules, default, spool, fail mode), in the same
order `evaluate` walks them, so both sides name the same rule.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spark_slurm.errors import InputError
from spark_slurm.policy.model import Limit, Rule
from spark_slurm.policy.site import Policy

LIMIT_FIELDS = ("min_watts_per_gpu", "max_watts_per_gpu", "default_watts_per_gpu",
                "max_node_watts", "max_gpus")


def lua_string(text: str) -> str:
    """A Lua 5.1 string literal; every byte outside printable ASCII as a decimal escape."""
    out = ['"']
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    out.append('"')
    return "".join(out)


def _limit_fields(limit: Limit) -> list[str]:
    fields = [f"{name} = {getattr(limit, name)}" for name in LIMIT_FIELDS
              if getattr(limit, name) is not None]
    fields.append(f"on_exceed = {lua_string(limit.on_exceed)}")
    return fields


def _section(limits: dict[str, Limit]) -> str:
    if not limits:
        return "{}"
    lines = [f"    [{lua_string(name)}] = {{ {', '.join(_limit_fields(limit))} }},"
             for name, limit in sorted(limits.items())]
    return "{\n" + "\n".join(lines) + "\n  }"


def _names(values: tuple[str, ...]) -> str:
    return "{ " + ", ".join(lua_string(v) for v in values) + " }"


def _rule(rule: Rule) -> str:
    match = []
    for key, values in (("account", rule.match.account), ("partition", rule.match.partition),
                        ("qos", rule.match.qos), ("class", rule.match.workload_class)):
        if values:
            match.append(f"{key} = {_names(values)}")
    fields = [f"id = {lua_string(rule.id)}", f"action = {lua_string(rule.action)}",
              f"match = {{ {', '.join(match)} }}"]
    if rule.action == "deny":
        fields.append(f"reason = {lua_string(rule.reason)}")
    else:
        fields += _limit_fields(rule.limit)
    return "    { " + ", ".join(fields) + " },"


def compile_lua(policy: Policy, spool: str | None = None) -> str:
    """The Lua chunk (`return { version = 1, ... }`) job_submit.lua loads at plugin load."""
    d = policy.data
    g = d.gpu
    source = "".join(c if " " <= c <= "~" else "?" for c in policy.source)
    rules = "{\n" + "\n".join(_rule(r) for r in d.rules) + "\n  }" if d.rules else "{}"
    lines = [
        f"-- spark-slurm admission policy, compiled from {source}",
        "-- by `sparkctl policy compile`; do not edit, recompile the YAML instead.",
        "return {",
        "  version = 1,",
        f"  policy_sha256 = {lua_string(policy.sha256)},",
        f"  default_watts_per_gpu = {g.default_watts},",
        f"  min_watts_per_gpu = {g.min_watts},",
        f"  max_watts_per_gpu = {g.max_watts},",
    ]
    if g.node_max_watts is not None:
        lines.append(f"  node_max_watts = {g.node_max_watts},")
    lines += [
        f"  on_exceed = {lua_string(g.on_exceed)},",
        f"  tenants = {_section(d.tenants)},",
        f"  partitions = {_section(d.partitions)},",
        f"  qos = {_section(d.qos)},",
        f"  classes = {_section(d.classes)},",
        f"  rules = {rules},",
        f"  spool = {lua_string(spool or d.admission.spool)},",
        f"  fail_mode = {lua_string(d.admission.fail_mode)},",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_lua(policy_path: str | Path, out: str | Path, spool: str | None = None) -> Policy:
    """Check a policy and atomically write its compiled table (a reader never sees half)."""
    policy = Policy.load(policy_path)
    chunk = compile_lua(policy, spool)
    target = Path(out)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".spark_policy.", dir=target.parent)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise InputError(f"{target}: cannot write compiled policy: "
                         f"{exc.strerror or exc}") from exc
    return policy
