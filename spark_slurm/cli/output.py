"""Rendering shared by every command: JSON for machines, aligned tables for people."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def echo_json(value: Any, *, err: bool = False) -> None:
    """Print one JSON document; stable key order so output diffs cleanly. `err` sends
    it to stderr (when stdout carries data, e.g. `ledger export --out -`)."""
    click.echo(json.dumps(value, sort_keys=True, indent=2, default=str), err=err)


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain aligned table (no colour: output is often piped or logged)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
