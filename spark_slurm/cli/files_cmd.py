"""`sparkctl files`: the admin files that ship in the package, and installing them."""

from __future__ import annotations

from pathlib import Path

import click

from spark_slurm.cli.output import echo_json, echo_table

_PREFIX_HELP = ("Prefix for libexec/, share/ and share/doc/ (the units and wrappers refer "
                "to paths under it).")


@click.group()
def files() -> None:
    """The Slurm plugin and wrappers, systemd units, dashboards, Prometheus config and
    rules, example configs and docs that ship with spark-slurm (docs/slurm-setup.md)."""


@files.command("list")
@click.option("--prefix", default="/usr/local", show_default=True,
              type=click.Path(path_type=Path), help=_PREFIX_HELP)
@click.option("--json", "as_json", is_flag=True, help="One object per file.")
def list_(prefix: Path, as_json: bool) -> None:
    """List every shipped file, where `install` puts it, and which hosts need it."""
    from spark_slurm.files import Layout, data_root, plan  # noqa: PLC0415 (lazy CLI)

    layout = Layout.current(prefix)
    rows = [{"target": str(target), "mode": f"{entry.mode:04o}", "kind": entry.kind,
             "hosts": entry.hosts, "purpose": entry.purpose, "source": entry.source}
            for entry, _path, target in plan(layout)]
    if as_json:
        echo_json({"data_root": str(data_root()), "files": rows})
        return
    click.echo(f"shipped in {data_root()}")
    echo_table(("TARGET", "MODE", "KIND", "HOSTS", "PURPOSE"),
               [(r["target"], r["mode"], r["kind"], r["hosts"], r["purpose"]) for r in rows])


@files.command()
@click.option("--root", default="/", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Write the tree under this directory (contents still name the final "
                   "paths, like DESTDIR).")
@click.option("--prefix", default="/usr/local", show_default=True,
              type=click.Path(path_type=Path), help=_PREFIX_HELP)
@click.option("--policy", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Site policy to compile into spark_policy.lua (default: "
                   "ROOT/etc/spark/policy.yaml, or the example when there is none).")
@click.option("--allow-ip", "allow_ips", multiple=True, metavar="ADDR",
              help="Address or prefix sparkd.service may talk to besides localhost: the "
                   "Prometheus server that scrapes it, a Karman meter on another host "
                   "(repeatable).")
@click.option("--force", is_flag=True,
              help="Replace existing configs (sparkd.yaml, policy.yaml, hook.json) too.")
@click.option("--dry-run", is_flag=True, help="Say what would be written; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="One object per file.")
def install(*, root: Path, prefix: Path, policy: Path | None, allow_ips: tuple[str, ...],
            force: bool, dry_run: bool, as_json: bool) -> None:
    """Write every admin file where it belongs and list what was written.

    Templates (hook wrappers, systemd units) are filled in for this installation:
    its interpreter, console scripts and package directory. Configs you edit are
    kept once they exist; every other file is brought up to date, so running this
    again after an upgrade is safe. Enable the units yourself afterwards.
    """
    from spark_slurm.files import Layout  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.files import install as do_install  # noqa: PLC0415

    layout = Layout.current(prefix, allow_ips)
    done = do_install(layout, root, policy=policy, force=force, dry_run=dry_run)
    if as_json:
        echo_json({"root": str(root), "dry_run": dry_run, "files": [w.to_json() for w in done]})
        return
    verb = "would be " if dry_run else ""
    for w in done:
        click.echo(f"{verb + w.action:<19} {w.mode:04o} {w.path}")
    counts: dict[str, int] = {}
    for w in done:
        counts[w.action] = counts.get(w.action, 0) + 1
    summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    click.echo(f"{len(done)} files under {root}: {summary}"
               + (" (dry run: nothing written)" if dry_run else ""))
    if any(w.action == "kept" for w in done):
        click.echo("kept files are configs that already existed (--force replaces them)")
