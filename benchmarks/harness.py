"""Shared measuring and reporting for `make bench`.

Every figure is reported beside a baseline measured in the same run (raw sqlite
insert+fsync, bare interpreter start, bare protobuf parse, ...) and as a ratio,
because the machines this runs on are small and noisy. Each bench module writes
its own results file; REPORT.md is rebuilt from all of them, so running one
module refreshes its section without discarding the others.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPORT = Path(__file__).parent / "REPORT.md"


@dataclass
class Figure:
    """One measured number, its same-run baseline, and the target it is held to."""

    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value


@dataclass
class Section:
    title: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; samples need not be sorted."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Wall time of each of n calls, in milliseconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def save(module: str, sections: list[Section]) -> None:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "module": module,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}",
        "sections": [asdict(s) for s in sections],
    }
    (RESULTS / f"{module}.json").write_text(json.dumps(payload, indent=2) + "\n")


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def render_report() -> str:
    lines = [
        "# spark-slurm benchmark report",
        "",
        "Written by `make bench` (`python -m benchmarks`). Each figure stands beside a",
        "baseline measured in the same run on the same machine; the ratio is what to",
        "compare across machines. Targets come from the design; `met` says whether this",
        "run met them.",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for sec in data["sections"]:
            lines += [f"## {sec['title']}", "",
                      f"Command: `{sec['command']}` — run {data['when']} on {data['machine']}", "",
                      "| what | value | baseline | baseline value | ratio | target | met |",
                      "|---|---|---|---|---|---|---|"]
            for f in sec["figures"]:
                fig = Figure(**f)
                met = {True: "yes", False: "**no**", None: "–"}[fig.met]
                base, target = fig.baseline_name or "–", fig.target or "–"
                lines.append(
                    f"| {fig.name} | {_fmt(fig.value)} {fig.unit} | {base} | "
                    f"{_fmt(fig.baseline_value)} | {_fmt(fig.ratio)} | {target} | {met} |"
                )
            for note in sec.get("notes", []):
                lines += ["", note]
            lines.append("")
    return "\n".join(lines)


def write_report() -> Path:
    REPORT.write_text(render_report())
    return REPORT
