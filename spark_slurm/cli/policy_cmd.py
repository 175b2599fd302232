"""`sparkctl policy`: check a site policy file, compile its admission part to Lua."""

from __future__ import annotations

import click

from spark_slurm.cli.output import echo_json
from spark_slurm.errors import InputError, PolicyError
from spark_slurm.policy import Policy
from spark_slurm.policy.lua import write_lua


def _report(exc: PolicyError, path: str, as_json: bool) -> InputError:
    """Print every problem as FILE:LINE:COL: message; return the summary error to raise."""
    if as_json:
        echo_json({"path": path, "ok": False, "errors": [
            {"line": line, "column": col, "message": msg} for line, col, msg in exc.problems]})
    else:
        for line, col, msg in exc.problems:
            click.echo(f"{path}:{line}:{col}: {msg}", err=True)
    count = len(exc.problems)
    return InputError(f"{path}: {count} error{'s' if count != 1 else ''} in policy")


@click.group()
def policy() -> None:
    """Check and compile the site power policy (docs/policy.md)."""


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def check(file: str, as_json: bool) -> None:
    """Check a policy file and list every error.

    Prints a short summary when FILE is valid; otherwise every problem as
    FILE:LINE:COL: message, and exits 2.
    """
    try:
        pol = Policy.load(file)
    except PolicyError as exc:
        raise _report(exc, file, as_json) from exc
    summary = pol.summary()
    if as_json:
        echo_json({"ok": True, **summary})
        return
    click.echo(f"{file}: ok, sha256 {pol.sha256[:16]}, {summary['rules']} rules, "
               f"{summary['tenants']} tenants, {summary['partitions']} partitions, "
               f"{summary['qos']} qos, {summary['classes']} classes; per GPU default "
               f"{summary['default_watts_per_gpu']} W, range {summary['min_watts_per_gpu']}-"
               f"{summary['max_watts_per_gpu']} W")


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--lua", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the table job_submit.lua loads (spark_policy.lua "
                   "next to slurm.conf).")
@click.option("--spool", default=None,
              help="Denial spool path for job_submit.lua (default: admission.spool).")
def compile(file: str, out: str, spool: str | None) -> None:
    """Compile a policy's admission rules to Lua.

    Writes the table slurm/job_submit.lua loads at plugin load (no YAML is read
    inside slurmctld). FILE is checked first; nothing is written if it is invalid.
    """
    try:
        pol = write_lua(file, out, spool)
    except PolicyError as exc:
        raise _report(exc, file, False) from exc
    click.echo(f"{out}: compiled from {file} (sha256 {pol.sha256[:16]})")
