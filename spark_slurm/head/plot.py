"""`audit --plot`: GPU power and governed caps over a job's life, one panel per node.

Power points come from the telemetry each action recorded (path 1, before the
change); caps are drawn as steps from every limit change the ledger holds
(cap read-back, throttle, release, drift, restore). matplotlib is imported only
here, with the Agg backend, so audits without a plot never pay for it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from spark_slurm.errors import InputError
from spark_slurm.head.audit import AuditReport

_NS = 1_000_000_000


def series(report: AuditReport) -> dict[str, dict[int, dict[str, list[tuple[int, int]]]]]:
    """node -> gpu -> {"power": [(t, mW)], "cap": [(t, mW)]} from the report's records."""
    out: dict[str, dict[int, dict[str, list[tuple[int, int]]]]] = defaultdict(
        lambda: defaultdict(lambda: {"power": [], "cap": []}))
    for e in report.timeline:
        body = e.body
        for g in body.get("gpus") or []:
            if not isinstance(g, dict) or not isinstance(g.get("index"), int):
                continue
            lanes = out[e.node][g["index"]]
            raw = g.get("before")
            before: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if isinstance(before.get("power_mw"), int):
                lanes["power"].append((int(before.get("time_ns", e.time_ns)), before["power_mw"]))
            if isinstance(before.get("limit_mw"), int):
                lanes["cap"].append((int(before.get("time_ns", e.time_ns)), before["limit_mw"]))
            limit = g.get("readback_mw", g.get("intended_mw"))
            if isinstance(limit, int):
                lanes["cap"].append((e.time_ns, limit))
        gpu = body.get("gpu")
        if isinstance(gpu, int):
            lanes = out[e.node][gpu]
            new = _limit_after(e.kind, body)
            if new is not None:
                lanes["cap"].append((e.time_ns, new))
    return {n: dict(g) for n, g in out.items()}


def _limit_after(kind: str, body: dict[str, Any]) -> int | None:
    if kind in ("throttle", "release"):
        value = body.get("to_mw")
    elif kind == "drift":
        value = body.get("readback_mw") if body.get("action") == "reconcile" \
            else body.get("observed_mw")
    else:
        return None
    return value if isinstance(value, int) else None


def plot_job(report: AuditReport, path: Path) -> Path:
    """Draw the job's power and caps to PNG or SVG (chosen by the file suffix)."""
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise InputError(f"{path}: plot file must end in .png or .svg")
    try:
        import matplotlib  # noqa: PLC0415 (lazy by design)
    except ImportError:
        raise InputError(f"{path}: plots need matplotlib, which is not installed "
                         "(pip install 'spark-slurm[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = series(report)
    nodes = sorted(data) or ["(no GPU data)"]
    t0 = min((e.time_ns for e in report.timeline), default=0)
    fig, axes = plt.subplots(len(nodes), 1, figsize=(12, 3.2 * len(nodes) + 0.8),
                             squeeze=False, sharex=True)
    for ax, node in zip(axes[:, 0], nodes, strict=True):
        for gpu, lanes in sorted(data.get(node, {}).items()):
            caps = sorted(lanes["cap"])
            if caps:
                ax.step([(t - t0) / _NS for t, _ in caps], [mw / 1000 for _, mw in caps],
                        where="post", label=f"gpu{gpu} cap")
            power = sorted(lanes["power"])
            if power:
                # Power is known only where a PER sampled it: markers, no invented ramp.
                ax.plot([(t - t0) / _NS for t, _ in power], [mw / 1000 for _, mw in power],
                        marker="o", linestyle="none", label=f"gpu{gpu} power (at PER)")
        for e in report.timeline:
            if e.node == node and e.kind in ("throttle", "drift", "fault"):
                ax.axvline((e.time_ns - t0) / _NS, color="red", alpha=0.3)
        ax.set_title(f"job {report.job_id} on {node}")
        ax.set_ylabel("W")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Outside the axes, so the legend never hides a cap step or a sample.
            ax.legend(fontsize="small", ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("seconds since the job's first record")
    fig.tight_layout()
    try:
        fig.savefig(path, format=suffix[1:], dpi=110)
    except OSError as exc:
        raise InputError(f"{path}: cannot write plot: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path
