"""`sparkctl intent`: an external executor announces a power-limit change to sparkd."""

from __future__ import annotations

import time
from pathlib import Path

import click

from spark_slurm.cli.daemon_cmd import SOCKET_OPTION
from spark_slurm.cli.output import echo_json
from spark_slurm.daemon import client
from spark_slurm.errors import InputError


@click.command()
@click.option("--job", "job_id", default=None,
              help="Slurm job whose GPUs these are (omit for GPUs no job holds).")
@click.option("--gpu", "gpus", type=int, multiple=True, required=True,
              help="GPU index as Slurm numbers it (device minor); repeat for several.")
@click.option("--watts", type=float, required=True,
              help="The limit the executor will set on each GPU, in watts.")
@click.option("--executor", "executor", required=True,
              help="The executor's name, recorded in the PER (e.g. dcgm, dps, site-script).")
@click.option("--deadline", "deadline_s", type=float, default=None,
              help="Seconds the change may take to land (default: executors.deadline_s).")
@click.option("--reason", default=None, help="Why (recorded with the request).")
@SOCKET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
def intent(*, job_id: str | None, gpus: tuple[int, ...], watts: float, executor: str,
           deadline_s: float | None, reason: str | None, socket_path: Path,
           as_json: bool) -> None:
    """Announce a limit an external executor is about to set (validate-only GPUs).

    sparkd checks it against the policy and the job's context and answers at once:
    approve (exit 0: go ahead and set exactly that) or deny (exit 1, the reason and
    the decision shown). It then watches the GPUs and records one `executor` PER
    when the change lands or the deadline passes: validated, denied-but-applied or
    intent-expired. Only root, the policy's admin group and `executors.users` may
    announce. See docs/executors.md.
    """
    if watts <= 0:
        raise InputError(f"--watts must be positive, not {watts:g}")
    if deadline_s is not None and deadline_s <= 0:
        raise InputError(f"--deadline must be a positive number of seconds, not {deadline_s:g}")
    reply = client.intent(list(gpus), watts, executor, job_id=job_id, deadline_s=deadline_s,
                          reason=reason, socket_path=socket_path)
    if as_json:
        echo_json(reply)
    client.checked(reply)  # a denial (or any refusal) exits 1 with the daemon's reason
    if as_json:
        return
    shown = reply.get("intent") or {}
    gpu_list = ",".join(str(g) for g in shown.get("gpus", gpus))
    left = max(0, int(shown.get("deadline_ns") or 0) - time.time_ns()) / 1e9
    click.echo(f"approved intent {shown.get('id')}: {executor} may set GPU {gpu_list} to "
               f"{watts:g} W" + (f" for job {job_id}" if job_id else "")
               + f"; sparkd records it once read back (within {left:.0f} s)")
