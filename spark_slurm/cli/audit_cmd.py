"""`sparkctl audit` and `sparkctl replay`: a job's proven story, and state at an instant."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from spark_slurm.cli.output import echo_json, echo_table
from spark_slurm.errors import CheckFailed

DEFAULT_DB = Path("/var/lib/spark/cluster.db")


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@click.command()
@click.argument("job_id")
@click.option("--db", "db", default=str(DEFAULT_DB), show_default=True,
              help="Cluster store (sqlite:///PATH, postgresql://..., or a path) or a node "
                   "ledger.")
@click.option("--tariff", "tariff", type=click.Path(dir_okay=False, path_type=Path),
              help="Tariff YAML (flat or time-of-use) to price the job's energy.")
@click.option("--price-kwh", "price_kwh", type=str,
              help="Flat price per kWh (instead of --tariff).")
@click.option("--currency", default="EUR", show_default=True, help="Currency for --price-kwh.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write GPU power and caps over time to this PNG or SVG file.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Trust store (<node>.pub, <node>.hmac): re-check every record's MAC, and "
                   "check a node ledger's keys as merge does.")
@click.option("--json", "as_json", is_flag=True, help="Print the stable JSON document.")
def audit(*, job_id: str, db: str, tariff: Path | None, price_kwh: str | None, currency: str,
          plot: Path | None, keys_dir: Path | None, as_json: bool) -> None:
    """Show a job's whole power story with every record's verification and a verdict.

    Exit 0 when every record verifies and every action is validated, 1 otherwise,
    2 for an unknown job or an unusable ledger or keys directory.
    """
    from spark_slurm.head.audit import audit_job  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.head.tariff import flat, load_tariff  # noqa: PLC0415

    priced = load_tariff(tariff) if tariff else (flat(price_kwh, currency) if price_kwh else None)
    report = audit_job(db, job_id, priced, plot, keys_dir)
    if as_json:
        echo_json(report.to_json())
    else:
        _render_audit(report)
        if plot is not None:
            click.echo(f"plot written to {plot}")
    if not report.ok:
        raise CheckFailed(f"audit of job {job_id}: {len(report.problems)} problem(s); "
                          f"first: {report.problems[0]}")


def _render_audit(report: object) -> None:
    from spark_slurm.head.audit import PATH_NAMES, AuditReport  # noqa: PLC0415 (lazy CLI)

    assert isinstance(report, AuditReport)
    h = report.header
    click.echo(f"job {report.job_id}  user {h['user']}  account {h['account']}  partition "
               f"{h['partition']}  qos {h['qos']}  class {h['workload_class']}  "
               f"({report.source} ledger)")
    gpus = "; ".join(f"{n}: {','.join(map(str, g)) or '-'}" for n, g in h["gpus"].items())
    click.echo(f"nodes {', '.join(h['nodes'])}  GPUs {gpus}")
    click.echo("")
    rows = []
    for e in report.timeline:
        mark = "✓" if e.verification.ok else "✗"
        proof = {"ok": "proof", "uncovered": "chain", "failed": "PROOF!"}[e.verification.proof]
        if e.verification.mac != "unchecked":
            proof += "+mac" if e.verification.mac == "ok" else " MAC!"
        paths = ""
        if e.paths is not None:
            paths = " ".join(f"{p[:4]}={e.paths.get(p, '-')}" for p in PATH_NAMES)
            paths += "  VALID" if e.validated else "  NOT VALIDATED"
        who = e.requester or ""
        if e.authority:
            who += f" [{e.authority}]"
        rows.append((_when(e.time_ns), e.node, e.seq, e.kind, f"{mark} {proof}", e.summary,
                     who.strip(), paths))
    echo_table(["time (UTC)", "node", "seq", "kind", "verified", "what", "by", "paths"], rows)
    click.echo("")
    from spark_slurm.head.audit import kwh_text  # noqa: PLC0415

    for g in report.energy:
        reset = " (counter reset seen)" if g.counter_reset else ""
        click.echo(f"energy {g.node} gpu{g.gpu}: {kwh_text(g.energy_mj)} kWh{reset}")
    click.echo(f"energy total: {kwh_text(report.energy_mj)} kWh")
    if report.cost is not None:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in report.cost.by_period_cost.items())
        click.echo(f"cost: {report.cost.total:.4f} {report.cost.currency} ({parts})")
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.ok:
        click.echo(f"VERDICT: all {len(report.timeline)} records verified and every action "
                   "validated")
    else:
        click.echo(f"VERDICT: {len(report.problems)} problem(s)")
        for p in report.problems:
            click.echo(f"  - {p}")


@click.command()
@click.option("--db", "db", default=str(DEFAULT_DB), show_default=True,
              help="Cluster store (sqlite:///PATH, postgresql://..., or a path) or a node "
                   "ledger.")
@click.option("--node", "node", help="Only this node.")
@click.option("--at", "at", required=True,
              help="Instant: ISO-8601 (UTC if no zone), Unix seconds or Unix ns.")
@click.option("--recheck", is_flag=True,
              help="Re-evaluate every recorded decision against its recorded policy.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def replay(*, db: str, node: str | None, at: str, recheck: bool, as_json: bool) -> None:
    """Each GPU's governed limit, its job and the PER behind it at an instant.

    With --recheck, exit 1 when any recorded decision does not reproduce.
    """
    from spark_slurm.head.replay import parse_time  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.head.replay import replay as run_replay  # noqa: PLC0415

    report = run_replay(db, parse_time(at), node, recheck)
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(f"state at {_when(report.at_ns)} UTC")
        echo_table(["node", "gpu", "limit W", "job", "per seq", "kind", "since"],
                   [(g.node, g.gpu, "-" if g.limit_mw is None else g.limit_mw / 1000,
                     g.job_id or "-", g.seq, g.kind, _when(g.time_ns)) for g in report.gpus])
        if recheck:
            bad = [r for r in report.rechecks if not r.ok]
            click.echo(f"recheck: {len(report.rechecks)} decisions, {len(bad)} do not reproduce")
            for r in bad:
                click.echo(f"  {r.node} seq {r.seq} ({r.kind}): {r.reason}; recorded "
                           f"{r.recorded}, replayed {r.replayed}")
    if not report.ok:
        bad = [r for r in report.rechecks if not r.ok]
        raise CheckFailed(f"replay: {len(bad)} recorded decision(s) do not reproduce")
