"""`sparkctl demo`: the whole system on one machine, every scenario asserted."""

from __future__ import annotations

from pathlib import Path

import click

from spark_slurm.cli.output import echo_json
from spark_slurm.errors import ScenarioFailed


@click.command()
@click.argument("scenarios", nargs=-1)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for everything the demo creates (default: a new temp dir).")
@click.option("--keep", is_flag=True,
              help="Leave the cluster running afterwards and print how to use and stop it.")
@click.option("--stop", "stop_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Stop a demo left running with --keep in this directory.")
@click.option("--nodes", type=int, default=None,
              help="Compute nodes, each in its own network namespace with its own slurmd, "
                   "sparkd and GPUs (default 3 where namespaces work, else 1).")
@click.option("--json", "as_json", is_flag=True, help="Also print the results as JSON.")
def demo(scenarios: tuple[str, ...], *, workdir: Path | None, keep: bool, stop_dir: Path | None,
         nodes: int | None, as_json: bool) -> None:
    """Start munge, Slurm, sparkd, 8 sim B200 GPUs per node and a Karman stream, run the
    scenarios (thermal, deny, driver-crash, oob, incident, no-cap, static-300, dynamic,
    partial-dynamic, multi-node; default all) as real sbatch jobs, collect and merge
    every node's ledger on the head node, audit every job, verify the ledger, write
    plots, and clean up.

    Exit 0 when every scenario's checks pass, 1 when one fails (listed), 2 for a
    usage error (unknown scenario, not root, Slurm missing). Needs root.
    """
    from spark_slurm.demo.run import run_demo, stop_demo  # noqa: PLC0415 (lazy CLI)

    if stop_dir is not None:
        for line in stop_demo(stop_dir):
            click.echo(f"stopped {line}")
        return
    result = run_demo(scenarios, workdir, keep, click.echo, nodes=nodes)
    if as_json:
        echo_json(result.to_json())
    passed = sum(1 for s in result.scenarios if s.ok)
    click.echo(f"{passed}/{len(result.scenarios)} scenarios passed; results in "
               f"{result.workdir / 'results'}")
    if not result.ok:
        raise ScenarioFailed("demo", result.failures())
