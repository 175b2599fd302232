"""The CLI reference page, generated from the click tree itself.

`docs/cli.md` is this module's output; a test regenerates it and fails when a
command lacks help text or the page is stale, so the docs cannot drift from
the code (`python -m spark_slurm.cli.reference > docs/cli.md` refreshes it).
Each command's help is rendered inside its real parent contexts, exactly as a
user sees it (`-h` is inherited from the root), at a fixed width so the page
does not depend on the terminal it was made in.
"""

from __future__ import annotations

from collections.abc import Iterator

import click

from spark_slurm.cli import cli

WIDTH = 80


def walk(command: click.Command, ctx: click.Context | None = None) -> Iterator[
        tuple[tuple[str, ...], click.Command, click.Context]]:
    """Every visible command and group, depth first, in name order, with its context."""
    if ctx is None:
        ctx = cli.make_context("sparkctl", [], resilient_parsing=True,
                               terminal_width=WIDTH, max_content_width=WIDTH)
    path = tuple(ctx.command_path.split())
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, click.Context(sub, info_name=name, parent=ctx))


def render() -> str:
    lines = ["# sparkctl command reference", "",
             "Generated from the commands' own help by "
             "`python -m spark_slurm.cli.reference > docs/cli.md`; a test keeps it current.", ""]
    for path, command, ctx in walk(cli):
        if len(path) > 1:
            lines += [f"## {' '.join(path)}", "", "```", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    click.echo(render(), nl=False)
