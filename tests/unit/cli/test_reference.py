"""Every sparkctl command is documented, and docs/cli.md matches the code."""

from __future__ import annotations

from pathlib import Path

from spark_slurm.cli import COMMANDS, cli
from spark_slurm.cli.reference import render, walk

DOCS = Path(__file__).resolve().parents[3] / "docs" / "cli.md"


def test_every_registered_command_is_importable() -> None:
    listed = {path[1] for path, _, _ in walk(cli) if len(path) == 2}
    assert listed == set(COMMANDS), f"registered but missing: {set(COMMANDS) - listed}"


def test_every_command_has_help_text() -> None:
    undocumented = [" ".join(path) for path, cmd, _ in walk(cli)
                    if len(path) > 1 and not (cmd.help or "").strip()]
    assert undocumented == []


def test_cli_reference_is_current() -> None:
    assert DOCS.read_text() == render(), (
        "docs/cli.md is stale: python -m spark_slurm.cli.reference > docs/cli.md")
