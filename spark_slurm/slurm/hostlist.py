"""Slurm hostlist expressions (`gpu[01-03,07],login1`) expanded to node names.

`scontrol show job -d` folds nodes with identical allocations into one
`Nodes=` expression, so per-node GPU indices need the expansion without
spawning `scontrol show hostnames` for every job.
"""

from __future__ import annotations

import re

from spark_slurm.errors import SlurmParseError

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
MAX_HOSTS = 65536


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise SlurmParseError("hostlist", text, "unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise SlurmParseError("hostlist", text, "unbalanced '['")
    parts.append(cur)
    return [p for p in parts if p]


def _ranges(body: str, text: str) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise SlurmParseError("hostlist", text, f"bad range {part!r}")
        if not sep:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        first, last = int(lo), int(hi)
        if last < first or last - first > MAX_HOSTS:
            raise SlurmParseError("hostlist", text, f"bad range {part!r}")
        out.extend(str(n).zfill(width) for n in range(first, last + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Every node name in a hostlist expression, in order."""
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        names = [""]
        pos = 0
        for match in _BRACKET.finditer(item):
            literal = item[pos:match.start()]
            names = [n + literal + r for n in names for r in _ranges(match.group(1), text)]
            pos = match.end()
            if len(names) > MAX_HOSTS:
                raise SlurmParseError("hostlist", text, "too many hosts")
        tail = item[pos:]
        if "[" in tail or "]" in tail:
            raise SlurmParseError("hostlist", text, "unbalanced brackets")
        hosts.extend(n + tail for n in names)
    return hosts
