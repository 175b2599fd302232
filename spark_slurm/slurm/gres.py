"""GRES and TRES strings as Slurm prints and accepts them.

Slurm spells the same request several ways depending on the flag and version:
`gres:gpu:2,gres:gpupower:800` (22.05 `TresPerNode`), `gres/gpu:h100:4` (23.02+),
`gpu:h100:4` (the `--gres` argument itself), `gres/gpu=2` (TRES counts) and, per
allocated node, `gpu:3(IDX:0-2),gpupower(CNT:900)`. Names are matched exactly,
so `gpu` is never confused with `gpupower`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spark_slurm.errors import SlurmParseError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-.]*$")
_COUNT = re.compile(r"^(\d+)([kKmMgG]?)$")
_SUFFIX = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# Count-only GRES have no types: `gpupower:abc` is a bad count, not a type `abc`.
UNTYPED = frozenset({"gpupower"})
# A gres count larger than this is a typo or an attack, not a request.
MAX_COUNT = 2**53


@dataclass(frozen=True, slots=True)
class GresRequest:
    """One requested GRES: name, optional type (`h100`), count (default 1)."""

    name: str
    type: str | None
    count: int


@dataclass(frozen=True, slots=True)
class GresAlloc:
    """One GRES allocated on a node: device indices (gpu) or a plain count (gpupower)."""

    name: str
    type: str | None
    count: int
    indices: tuple[int, ...] = ()


def parse_count(text: str, field: str = "gres count") -> int:
    """A Slurm count with an optional binary suffix (`2`, `1k`); rejects everything else."""
    match = _COUNT.match(text.strip())
    if match is None:
        raise SlurmParseError(field, text, "count must be a non-negative integer")
    value = int(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if value > MAX_COUNT:
        raise SlurmParseError(field, text, f"count exceeds {MAX_COUNT}")
    return value


def _strip_prefix(item: str) -> str:
    for prefix in ("gres:", "gres/"):
        if item.startswith(prefix):
            return item[len(prefix):]
    return item


def _check_name(name: str, item: str, field: str) -> str:
    if not _NAME.match(name):
        raise SlurmParseError(field, item, f"bad GRES name {name!r}")
    return name


def parse_gres(text: str | None, field: str = "gres") -> list[GresRequest]:
    """Parse a request list (`--gres`, TresPerNode/Job/Task, JOB_GRES, TRES counts).

    Non-GRES TRES items (`cpu=2`, `mem=1G`, `node=1`) are skipped; `(null)`,
    `N/A` and empty text mean no request.
    """
    if text is None:
        return []
    text = text.strip()
    if text in ("", "(null)", "N/A", "None"):
        return []
    out: list[GresRequest] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise SlurmParseError(field, text, "empty item")
        if "=" in item:                      # TRES style: gres/gpu:h100=2, cpu=4
            key, _, value = item.partition("=")
            if not key.startswith(("gres/", "gres:")):
                continue
            parts = _strip_prefix(key).split(":")
            if len(parts) > 2:
                raise SlurmParseError(field, item, "too many ':' fields")
            name = _check_name(parts[0], item, field)
            gtype = parts[1] if len(parts) == 2 and parts[1] else None
            out.append(GresRequest(name, gtype, parse_count(value, f"{field} item {item!r}")))
            continue
        body = re.sub(r"\(.*\)$", "", _strip_prefix(item))   # drop (IDX:..)/(CNT:..)
        parts = body.split(":")
        name = _check_name(parts[0], item, field)
        if len(parts) == 1:
            out.append(GresRequest(name, None, 1))
        elif len(parts) == 2:
            # gpu:2 (count) or gpu:h100 (type, count 1): a count starts with a digit.
            if parts[1][:1].isdigit():
                out.append(GresRequest(name, None, parse_count(parts[1], f"{field} item {item!r}")))
            elif parts[1] and _NAME.match(parts[1]) and name not in UNTYPED:
                out.append(GresRequest(name, parts[1], 1))
            else:
                raise SlurmParseError(field, item, f"bad count {parts[1]!r}")
        elif len(parts) == 3:
            if name in UNTYPED:
                raise SlurmParseError(field, item, f"{name} takes a count, not a type")
            if not parts[1] or not _NAME.match(parts[1]):
                raise SlurmParseError(field, item, f"bad GRES type {parts[1]!r}")
            out.append(GresRequest(name, parts[1], parse_count(parts[2], f"{field} item {item!r}")))
        else:
            raise SlurmParseError(field, item, "too many ':' fields")
    return out


def total(requests: list[GresRequest], name: str) -> int | None:
    """Sum of counts for exactly `name` (all types), or None when not requested."""
    counts = [r.count for r in requests if r.name == name]
    return sum(counts) if counts else None


def parse_index_list(text: str, field: str = "IDX") -> list[int]:
    """`0-2,5` -> [0, 1, 2, 5]; sorted, no duplicates."""
    out: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise SlurmParseError(field, text, f"bad index range {part!r}")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first or last - first > 65536:
            raise SlurmParseError(field, text, f"bad index range {part!r}")
        out.update(range(first, last + 1))
    return sorted(out)


_ALLOC = re.compile(r"^(?P<spec>[^()]+?)(?:\((?P<detail>[^()]*)\))?$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (`gpu:2(IDX:0,2),gpupower(CNT:8)`)."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SlurmParseError("GRES", text, "unbalanced ')'")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SlurmParseError("GRES", text, "unbalanced '('")
    items.append("".join(cur))
    return items


def parse_gres_alloc(text: str | None) -> list[GresAlloc]:
    """Parse one node's allocation as `scontrol show job -d` prints it (`GRES=...`)."""
    if text is None or text.strip() in ("", "(null)", "N/A"):
        return []
    out: list[GresAlloc] = []
    for item in _split_top(text.strip()):
        match = _ALLOC.match(item.strip())
        if match is None:
            raise SlurmParseError("GRES", text, f"bad item {item!r}")
        spec = _strip_prefix(match.group("spec"))
        parts = spec.split(":")
        name = _check_name(parts[0], item, "GRES")
        gtype: str | None = None
        count: int | None = None
        for extra in parts[1:]:
            if extra[:1].isdigit():
                count = parse_count(extra, f"GRES item {item!r}")
            elif extra:
                gtype = extra
        indices: tuple[int, ...] = ()
        detail = match.group("detail") or ""
        for piece in _split_detail(detail):
            key, _, value = piece.partition(":")
            if key == "IDX" and value not in ("", "N/A"):
                indices = tuple(parse_index_list(value, f"GRES item {item!r} IDX"))
            elif key == "CNT":
                count = parse_count(value, f"GRES item {item!r} CNT")
        if count is None:
            count = len(indices) if indices else 1
        out.append(GresAlloc(name, gtype, count, indices))
    return out


def _split_detail(detail: str) -> list[str]:
    """`IDX:0-1,3` or `CNT:800` (22.05), tolerant of several `KEY:` groups."""
    pieces: list[str] = []
    for chunk in detail.split(","):
        if ":" in chunk.split("-")[0] and not chunk[:1].isdigit():
            pieces.append(chunk)
        elif pieces:
            pieces[-1] += "," + chunk
        elif chunk:
            raise SlurmParseError("GRES detail", detail, f"bad piece {chunk!r}")
    return pieces
