"""The `spark:` token job_submit.lua writes into a job's admin comment.

Format: `spark:v=1,watts=<node W>,gpus=<n>,wpg=<W per GPU>,class=<c>,rule=<id>,
policy=<sha16>,injected=<0|1>`. Users cannot edit `AdminComment`, so the daemon
trusts it as the admission decision; a user `--comment=spark:class=...` only
names a workload class. Unknown keys are kept (newer Lua, older daemon).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from spark_slurm.errors import SlurmParseError

_TOKEN = re.compile(r"(?:^|[\s;|])spark:(?P<body>[^\s;|]*)")
_INT_KEYS = ("v", "watts", "gpus", "wpg", "injected")


@dataclass(frozen=True, slots=True)
class AdminToken:
    """The admission decision slurmctld recorded for a job."""

    v: int
    watts: int | None
    gpus: int | None
    wpg: int | None
    workload_class: str | None
    rule: str | None
    policy: str | None
    injected: bool
    extra: dict[str, str] = field(default_factory=dict)


def token_fields(text: str | None, where: str = "comment") -> dict[str, str] | None:
    """The key=value pairs of the first `spark:` token in text, or None without one."""
    if not text:
        return None
    match = _TOKEN.search(text)
    if match is None:
        return None
    out: dict[str, str] = {}
    body = match.group("body")
    for pair in body.split(","):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SlurmParseError(where, text, f"token item {pair!r} is not key=value")
        out[key] = value
    return out


def parse_admin_token(text: str | None) -> AdminToken | None:
    """Parse the admin-comment token; None when the job has none (e.g. no GPUs)."""
    fields = token_fields(text, "AdminComment")
    if fields is None:
        return None
    ints: dict[str, int | None] = {}
    for key in _INT_KEYS:
        raw = fields.get(key)
        if raw is None or raw == "":
            ints[key] = None
        elif raw.isdigit():
            ints[key] = int(raw)
        else:
            raise SlurmParseError("AdminComment", str(text), f"{key}={raw!r} is not an integer")
    known = {"v", "watts", "gpus", "wpg", "class", "rule", "policy", "injected"}
    return AdminToken(
        v=ints["v"] or 1,
        watts=ints["watts"],
        gpus=ints["gpus"],
        wpg=ints["wpg"],
        workload_class=None if fields.get("class") in (None, "", "-") else fields["class"],
        rule=fields.get("rule") or None,
        policy=fields.get("policy") or None,
        injected=ints["injected"] == 1,
        extra={k: v for k, v in fields.items() if k not in known},
    )


def comment_class(comment: str | None) -> str | None:
    """The workload class a user named with `--comment=spark:class=...`, if any."""
    try:
        fields = token_fields(comment, "Comment")
    except SlurmParseError:
        return None   # a free-text user comment is not ours to reject
    if not fields:
        return None
    return fields.get("class") or None
