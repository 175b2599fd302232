"""The CLI reference page, generated from the click tree itself.

`docs/cli.md` is this module's output; a test regenerates it and fails when a
command lacks help text or the page is stale, so the docs cannot drift from
the code (`python -m spark_slurm.cli.reference > docs/cli.md` refreshes it).
"""

from __future__ import annotations

from collections.abc import Iterator

import click

from spark_slurm.cli import cli


def walk(command: click.Command, path: tuple[str, ...] = ("sparkctl",)) -> Iterator[
        tuple[tuple[str, ...], click.Command]]:
    """Every command and group, depth first, in name order."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1])
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, (*path, name))


def render() -> str:
    lines = ["# sparkctl command reference", "",
             "Generated from the commands' own help by "
             "`python -m spark_slurm.cli.reference > docs/cli.md`; a test keeps it current.", ""]
    for path, command in walk(cli):
        if len(path) == 1:
            continue
        # A fixed width: the page must not depend on the terminal it was made in.
        ctx = click.Context(command, info_name=" ".join(path), terminal_width=80,
                            max_content_width=80)
        lines += [f"## {' '.join(path)}", "", "```", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    click.echo(render(), nl=False)
