"""`sparkctl daemon`, `sparkctl status`, `sparkctl cap`: run and talk to sparkd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from spark_slurm.cli.output import echo_json, echo_table
from spark_slurm.daemon import client
from spark_slurm.errors import SparkError

SOCKET_OPTION = click.option("--socket", "socket_path", type=click.Path(path_type=Path),
                       default=client.DEFAULT_SOCKET, show_default=True,
                       help="sparkd's unix socket.")


def _w(mw: Any) -> str:
    return "–" if mw is None else f"{mw / 1000:g} W"


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              default=Path("/etc/spark/sparkd.yaml"), show_default=True,
              help="sparkd.yaml to run with.")
def daemon(config_path: Path) -> None:
    """Run the node daemon in the foreground (same as `sparkd --config FILE`)."""
    from spark_slurm.daemon.main import run_daemon  # noqa: PLC0415 (heavy; only here)

    code = run_daemon(config_path)
    if code:
        raise SystemExit(code)


@click.command()
@SOCKET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
def status(socket_path: Path, as_json: bool) -> None:
    """Show daemon health, GPUs and their caps, governed jobs, and the ledger head."""
    reply = client.status(socket_path)
    if as_json:
        echo_json(reply)
        return
    ledger = reply.get("ledger", {})
    policy = reply.get("policy", {})
    click.echo(f"sparkd on {reply.get('node')}: pid {reply.get('pid')}, up "
               f"{reply.get('uptime_s')} s, RSS {reply.get('rss_kib', 0) // 1024} MiB")
    click.echo(f"ledger {ledger.get('path')}: head seq {ledger.get('seq')} "
               f"{str(ledger.get('hash') or '')[:16]}")
    click.echo(f"policy {policy.get('path')}: sha256 {str(policy.get('sha256') or '')[:16]}")
    rows = [[g["index"], _w(g.get("power_mw")), _w(g.get("enforced_mw")),
             _w(g.get("governed_mw")),
             "–" if g.get("temp_mc") is None else f"{g['temp_mc'] / 1000:.0f} °C",
             g.get("job") or ("(another user's)" if g.get("held") else "–"),
             ",".join(f for f in ("throttled", "fault") if g.get(f)) or "ok"]
            for g in reply.get("gpus", [])]
    echo_table(["gpu", "power", "limit", "governed", "temp", "job", "state"], rows)
    for problem in reply.get("problems", []):
        click.echo(f"UNHEALTHY: {problem}")
    jobs = reply.get("jobs", [])
    click.echo(f"{len(jobs)} job(s) governed" + (": " + ", ".join(
        f"{j['job_id']} ({j.get('user')}, {_w(j.get('granted_mw'))}/GPU)" for j in jobs)
        if jobs else ""))


@click.command()
@click.option("--job", "job_id", required=True, help="Slurm job id.")
@click.option("--watts", type=float, required=True, help="New cap per GPU, in watts.")
@click.option("--reason", default=None, help="Why (recorded in the PER).")
@SOCKET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
def cap(job_id: str, watts: float, reason: str | None, socket_path: Path,
        as_json: bool) -> None:
    """Change a running job's per-GPU power cap (owners may lower; admins within limits)."""
    if watts <= 0:
        raise SparkError(f"--watts must be positive, not {watts:g}")
    reply = client.cap(job_id, watts, reason, socket_path)
    if as_json:
        echo_json(reply)
        return
    decision = reply.get("decision", {})
    click.echo(f"job {job_id}: {decision.get('action')} by rule {decision.get('rule')} — "
               f"{_w(decision.get('granted_mw'))} per GPU (PER seq {reply.get('seq')})")
    bad = [g for g in reply.get("gpus", []) if not g.get("ok")]
    for g in bad:
        click.echo(f"  GPU {g['index']}: read back {_w(g.get('readback_mw'))}, intended "
                   f"{_w(g.get('intended_mw'))} {g.get('error', '')}".rstrip())
