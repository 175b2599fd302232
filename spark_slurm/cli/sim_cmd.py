"""`sparkctl sim`: create and drive a simulated GPU fleet from outside the daemon."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import click

from spark_slurm.cli.output import echo_json, echo_table
from spark_slurm.errors import InputError
from spark_slurm.gpu.backend import reason_names
from spark_slurm.gpu.sim import SimFleet, SmiRow


def _watts(mw: int) -> str:
    return f"{mw / 1000:.2f} W"


@click.group()
def sim() -> None:
    """Simulated GPUs whose state lives in a directory shared by every process."""


@sim.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--gpus", "gpus", type=int, required=True, help="Number of GPUs.")
@click.option("--model", default="b200", show_default=True, help="b200, h100 or a100.")
@click.option("--minor-base", type=int, default=0, show_default=True,
              help="Minor number of GPU 0 (/dev/nvidiaN); the others follow.")
@click.option("--minors", default=None,
              help="Explicit minor numbers, comma separated (e.g. 3,2,1,0).")
@click.option("--min-w", type=float, default=None, help="Override the minimum limit (W).")
@click.option("--max-w", type=float, default=None, help="Override the maximum limit (W).")
@click.option("--default-w", type=float, default=None, help="Override the default limit (W).")
@click.option("--force", is_flag=True, help="Replace a fleet already in DIRECTORY.")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
def init(*, directory: Path, gpus: int, model: str, minor_base: int, minors: str | None,
         min_w: float | None, max_w: float | None, default_w: float | None, force: bool,
         as_json: bool) -> None:
    """Create N idle GPUs of a model in DIRECTORY (default limit, ambient temperature)."""
    fleet = SimFleet.init(
        directory, gpus, model, minor_base=minor_base, force=force,
        minors=None if minors is None else _int_list(minors),
        min_mw=_mw(min_w), max_mw=_mw(max_w), default_mw=_mw(default_w))
    if as_json:
        echo_json([asdict(d) for d in fleet.devices])
        return
    m = fleet.model
    click.echo(f"initialised {len(fleet.devices)} x {m.name} in {directory} "
               f"(limits {m.min_mw // 1000}-{m.max_mw // 1000} W, default "
               f"{m.default_mw // 1000} W)")


def _mw(watts: float | None) -> int | None:
    """Watts from the command line to integer milliwatts; NaN and infinities refused."""
    if watts is None:
        return None
    if not math.isfinite(watts):
        raise InputError(f"{watts} is not a number of watts")
    return round(watts * 1000)


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--minors: {text!r} is not a comma-separated list of integers"
                         ) from None


@sim.command("smi")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-i", "--id", "index", type=int, default=None, help="Only this GPU.")
@click.option("-pl", "--power-limit", "watts", type=float, default=None,
              help="Set the power limit in watts, out of band (like nvidia-smi -pl).")
@click.option("-pm", "--persistence-mode", "persistence", type=click.Choice(["0", "1"]),
              default=None, help="Set persistence mode off (0) or on (1).")
@click.option("--json", "as_json", is_flag=True, help="Print readings as JSON.")
def smi(*, directory: Path, index: int | None, watts: float | None, persistence: str | None,
        as_json: bool) -> None:
    """Show the GPUs like nvidia-smi, or change a limit around the daemon with -pl."""
    fleet = SimFleet.open(directory)
    if persistence is not None:
        word = "Enabled" if persistence == "1" else "Disabled"
        for dev in fleet.set_persistence(index, persistence == "1"):
            click.echo(f"{word} persistence mode for GPU {dev.pci_bus_id}.")
        click.echo("All done.")
        return
    if watts is not None:
        for change in fleet.oob_set_limit(index, _mw(watts) or 0):
            click.echo(f"Power limit for GPU {change.device.pci_bus_id} was set to "
                       f"{_watts(change.new_mw)} from {_watts(change.old_mw)}.")
        click.echo("All done.")
        return
    rows = fleet.smi(index)
    if as_json:
        echo_json([_row_json(r) for r in rows])
    elif index is not None:
        _detail(rows[0])
    else:
        _table(rows)


def _row_json(r: SmiRow) -> dict[str, object]:
    return {"device": asdict(r.device), "error": r.error, "persistence": r.persistence,
            "limits": None if r.limits is None else asdict(r.limits),
            "sample": None if r.sample is None else asdict(r.sample)}


def _table(rows: list[SmiRow]) -> None:
    table = []
    for r in rows:
        d = r.device
        if r.sample is None or r.limits is None:
            table.append([d.index, d.name, d.pci_bus_id, d.minor, "ERR!", "ERR!", "ERR!",
                          "ERR!", r.error or ""])
            continue
        s = r.sample
        table.append([d.index, d.name, d.pci_bus_id, d.minor, f"{s.temp_mc // 1000}C",
                      f"{s.power_mw / 1000:.0f}W / {r.limits.enforced_mw / 1000:.0f}W",
                      f"{s.util_pct}%", "On" if r.persistence else "Off",
                      ",".join(reason_names(s.reasons)) or "-"])
    echo_table(["GPU", "Name", "Bus-Id", "Minor", "Temp", "Pwr:Usage/Cap", "Util",
                "Persist", "Clocks-Event"], table)


def _detail(r: SmiRow) -> None:
    d = r.device
    lines = [f"GPU {d.pci_bus_id}", ("Product Name", d.name), ("Minor Number", d.minor),
             ("GPU UUID", d.uuid)]
    if r.sample is None or r.limits is None:
        lines.append(("Status", r.error or "unknown error"))
    else:
        s, lim = r.sample, r.limits
        lines += [
            ("Persistence Mode", "Enabled" if r.persistence else "Disabled"),
            ("Clocks Event Reasons", ", ".join(reason_names(s.reasons)) or "None"),
            ("GPU Current Temp", f"{s.temp_mc / 1000:.0f} C"),
            ("Utilization Gpu", f"{s.util_pct} %"),
            ("Power Draw", _watts(s.power_mw)),
            ("Current Power Limit", _watts(lim.enforced_mw)),
            ("Requested Power Limit", _watts(lim.requested_mw)),
            ("Default Power Limit", _watts(lim.default_mw)),
            ("Min Power Limit", _watts(lim.min_mw)),
            ("Max Power Limit", _watts(lim.max_mw)),
            ("Total Energy Consumption", f"{s.energy_mj} mJ"),
        ]
    for line in lines:
        if isinstance(line, str):
            click.echo(line)
        else:
            click.echo(f"    {line[0]:<32}: {line[1]}")


@sim.command("fault")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--gpu", "index", type=int, required=True, help="GPU index.")
@click.argument("kind")
@click.option("--for", "seconds", type=float, default=None,
              help="Duration in seconds (default: until `clear`).")
def fault(*, directory: Path, index: int, kind: str, seconds: float | None) -> None:
    """Inject a fault: driver-crash, silent-mismatch, no-permission, thermal-spike,
    driver-reload (instant), or clear (end all faults on the GPU)."""
    SimFleet.open(directory).inject_fault(index, kind, seconds)
    span = "" if seconds is None or kind in ("clear", "driver-reload") else f" for {seconds:g} s"
    click.echo(f"GPU {index}: {kind}{span}")


@sim.command("load")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--util", type=float, required=True, help="Utilisation as a fraction 0..1.")
@click.option("--gpu", "index", type=int, default=None, help="Only this GPU (default all).")
def load(*, directory: Path, util: float, index: int | None) -> None:
    """Set the simulated workload's utilisation on one GPU or all of them."""
    SimFleet.open(directory).set_load(util, index)
    click.echo(f"{'all GPUs' if index is None else f'GPU {index}'}: utilisation {util:g}")


@sim.command("executor")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--gpu", "gpus", type=int, multiple=True, required=True,
              help="GPU (Slurm index / device minor); repeat for several.")
@click.option("--watts", type=float, required=True, help="The limit to announce, in watts.")
@click.option("--name", default="sim-executor", show_default=True,
              help="The executor's name, as sparkd records it.")
@click.option("--job", "job_id", default=None, help="Slurm job whose GPUs these are.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              default=Path("/run/spark/sparkd.sock"), show_default=True,
              help="sparkd's unix socket.")
@click.option("--announce/--no-announce", default=True, show_default=True,
              help="Announce the intent to sparkd first (--no-announce: change it blind).")
@click.option("--apply/--no-apply", default=True, show_default=True,
              help="Set the limit after announcing (--no-apply: announce only).")
@click.option("--ignore-deny", is_flag=True, help="Set the limit even when sparkd denied it.")
@click.option("--apply-watts", type=float, default=None,
              help="Set this instead of what was announced (a misbehaving executor).")
@click.option("--delay", "delay_s", type=float, default=0.0, show_default=True,
              help="Seconds between the answer and the change.")
@click.option("--deadline", "deadline_s", type=float, default=None,
              help="Seconds sparkd should wait for the change to land.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def executor(*, directory: Path, gpus: tuple[int, ...], watts: float, name: str,
             job_id: str | None, socket_path: Path, announce: bool, apply: bool,
             ignore_deny: bool, apply_watts: float | None, delay_s: float,
             deadline_s: float | None, as_json: bool) -> None:
    """Act as an external executor (like DCGM or a site script) on a simulated fleet:
    announce an intent to sparkd, then change the limits out of band (sim smi -pl)."""
    from spark_slurm.gpu.sim_executor import Plan, run_executor  # noqa: PLC0415 (lazy)

    for value, what in ((watts, "--watts"), (apply_watts, "--apply-watts")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"{what} must be a positive number of watts, not {value}")
    if not (math.isfinite(delay_s) and delay_s >= 0):
        raise InputError(f"--delay must be a number of seconds >= 0, not {delay_s}")
    plan = Plan(gpus=gpus, watts=watts, name=name, job_id=job_id, announce=announce,
                apply=apply, obey=not ignore_deny, apply_watts=apply_watts, delay_s=delay_s,
                deadline_s=deadline_s)
    outcome = run_executor(plan, SimFleet.open(directory), socket_path)
    if as_json:
        echo_json(outcome.to_json())
        return
    if outcome.reply is not None:
        error = outcome.reply.get("error") or {}
        click.echo(f"sparkd: {outcome.reply.get('verdict') or error.get('code')}"
                   + (f" ({error['message']})" if error.get("message") else ""))
    for change in outcome.applied:
        click.echo(f"GPU {change.device.index}: power limit {_watts(change.old_mw)} -> "
                   f"{_watts(change.new_mw)}")
    if outcome.skipped:
        click.echo(f"not applied: {outcome.skipped}")
