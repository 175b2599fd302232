"""`sparkctl`: the one entry point. Thin: parse options, call the library, render.

Command groups live one per module and are imported only when invoked, so
`sparkctl --help` and hot commands stay fast. This module is the single place
that turns `SparkError` into `sparkctl: message` and an exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from typing import Any

import click

from spark_slurm.errors import EXIT_INTERRUPTED, EXIT_USAGE, SparkError

# command name -> "module:attribute"; each module owns one command or group.
COMMANDS: dict[str, str] = {
    "verify": "spark_slurm.cli.ledger_cmd:verify",
    "ledger": "spark_slurm.cli.ledger_cmd:ledger",
    "sim": "spark_slurm.cli.sim_cmd:sim",
    "karman": "spark_slurm.cli.karman_cmd:karman",
    "policy": "spark_slurm.cli.policy_cmd:policy",
    "daemon": "spark_slurm.cli.daemon_cmd:daemon",
    "status": "spark_slurm.cli.daemon_cmd:status",
    "cap": "spark_slurm.cli.daemon_cmd:cap",
    "intent": "spark_slurm.cli.intent_cmd:intent",
    "merge": "spark_slurm.cli.head_cmd:merge",
    "positions": "spark_slurm.cli.head_cmd:positions",
    "prune": "spark_slurm.cli.head_cmd:prune",
    "backup": "spark_slurm.cli.head_cmd:backup",
    "restore": "spark_slurm.cli.head_cmd:restore",
    "witness": "spark_slurm.cli.head_cmd:witness",
    "collect": "spark_slurm.cli.collect_cmd:collect",
    "audit": "spark_slurm.cli.audit_cmd:audit",
    "replay": "spark_slurm.cli.audit_cmd:replay",
    "demo": "spark_slurm.cli.demo_cmd:demo",
    "evidence": "spark_slurm.cli.evidence_cmd:evidence",
    "verify-evidence": "spark_slurm.cli.evidence_cmd:verify_evidence",
    "files": "spark_slurm.cli.files_cmd:files",
}


def _available() -> list[str]:
    names = []
    for name, target in COMMANDS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return sorted(names)


class LazyGroup(click.Group):
    """Imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_available()) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        target = COMMANDS.get(cmd_name)
        if target is None or cmd_name not in _available():
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="spark-slurm")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Govern GPU power on Slurm clusters and prove every power action."""
    ctx.obj = {"verbose": verbose}


def run(args: list[str] | None = None, prog: str = "sparkctl") -> int:
    """Run the CLI and map every error to `prog: message` plus an exit code."""
    argv = sys.argv[1:] if args is None else args
    verbose = "--verbose" in argv or "-v" in argv
    try:
        cli.main(args=argv, prog_name=prog, standalone_mode=False)
    except SparkError as exc:
        if verbose:
            traceback.print_exc()
        click.echo(f"{prog}: {exc.message}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if exc.exit_code not in (0, 1) else exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except BrokenPipeError:
        return 0
    return 0


def main() -> Any:
    sys.exit(run())
