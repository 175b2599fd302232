"""`sparkctl merge`, `positions` and `witness`: the head node's nightly and 15-minute duties."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from spark_slurm.cli.output import echo_json, echo_table
from spark_slurm.errors import MergeFailed

DB_HELP = ("Cluster store: sqlite:///PATH, postgresql://..., or a file path (SQLite).")


@click.command()
@click.option("--db", "--into", "db", required=True,
              help=DB_HELP + " Created when missing.")
@click.option("--keys", "keys", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of <node>.pub / <node>.hmac the head node trusts.")
@click.option("--witness-state", "witness_state",
              type=click.Path(file_okay=False, path_type=Path),
              help="Witness state directory: check nodes against what it cosigned.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="PostgreSQL: processes merging different nodes at once (default: up "
                   "to 4, one per CPU). SQLite has one writer: sources go in turn.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("ledgers", nargs=-1, required=True)
def merge(*, db: str, keys: Path | None, witness_state: Path | None, progress: bool | None,
          workers: int | None, as_json: bool, ledgers: tuple[str, ...]) -> None:
    """Verify what nodes wrote since the last merge and append it to the cluster store.

    Each LEDGER is a node ledger snapshot or a segment (`sparkctl ledger export`),
    as PATH or NODE=PATH; only rows past the node's held head are read. Idempotent;
    every problem is a finding (GAP, FORK, ROLLBACK, DUPLICATE, REORDER, TAMPERED,
    FOREIGN_ORIGIN, UNKNOWN_KEY, EPOCH_GAP) naming node and seq. Exit 1 when any
    node had findings; the healthy nodes are merged regardless.
    """
    from spark_slurm.head.merge import merge_ledgers  # noqa: PLC0415 (lazy CLI)

    show = sys.stderr.isatty() if progress is None else progress
    if show:
        with click.progressbar(length=len(ledgers), label="merging", file=sys.stderr,
                               show_pos=True) as bar:
            summary = merge_ledgers(db, ledgers, keys_dir=keys, witness_state=witness_state,
                                    progress=bar.update, workers=workers)
    else:
        summary = merge_ledgers(db, ledgers, keys_dir=keys, witness_state=witness_state,
                                workers=workers)
    if as_json:
        echo_json(summary.to_json())
    else:
        for r in summary.results:
            state = "ok" if r.ok else ("ERROR " + r.error if r.error else "FINDINGS")
            click.echo(f"{r.node or '?':<16} {r.source}: +{r.appended} records, head seq "
                       f"{r.head_seq if r.head_seq is not None else '-'}  {state}")
            for f in r.findings:
                seq = "-" if f.seq is None else f.seq
                click.echo(f"  {f.code:<15} node {f.node} seq {seq}: {f.detail}")
        click.echo(f"merged {summary.appended} new records into {summary.into}")
    if not summary.ok:
        bad = [r.node or r.source for r in summary.results if not r.ok]
        raise MergeFailed(f"merge: findings or errors on {', '.join(bad)} (healthy nodes merged)")


@click.command()
@click.option("--db", "db", required=True, help=DB_HELP)
@click.option("--seq", "seq_only", is_flag=True,
              help="Print only each named node's head seq, one per line (-1: none held), "
                   "for `sparkctl ledger export --after`.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.argument("nodes", nargs=-1)
def positions(*, db: str, seq_only: bool, as_json: bool, nodes: tuple[str, ...]) -> None:
    """What the cluster store holds of each node: where the next segment starts.

    A collector asks this before exporting: `sparkctl ledger export LEDGER --after
    SEQ` on the node ships only what is new. A node the store does not know has no
    head (-1 with --seq): export it whole.
    """
    from spark_slurm.head.merge import positions as held  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.head.store import display_url  # noqa: PLC0415

    states = held(db, nodes)
    if as_json:
        echo_json({"db": display_url(db), "nodes": [s.to_json() for s in states]})
    elif seq_only:
        for s in states:
            click.echo(str(s.head_seq if s.head_seq is not None else -1))
    else:
        echo_table(["node", "head seq", "head hash", "records", "first seq"],
                   [(s.name, "-" if s.head_seq is None else s.head_seq, s.head_hash or "-",
                     s.count, s.first_seq) for s in states])


@click.command()
@click.option("--db", "db", required=True, help=DB_HELP)
@click.option("--before", "before", required=True,
              help="Remove records older than this: ISO-8601 (UTC if no zone), Unix seconds "
                   "or Unix ns. PostgreSQL drops the monthly partitions wholly before it.")
@click.option("--archive", "archive", type=click.Path(dir_okay=False, path_type=Path),
              help="First copy what goes into this SQLite cluster store (created, or "
                   "extended): `sparkctl audit --db ARCHIVE` still proves it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(*, db: str, before: str, archive: Path | None, as_json: bool) -> None:
    """Retention: drop old records from the cluster store; what is kept still verifies.

    Per node, the genesis and the head record always stay; the hash of the last
    record removed and the leaves of its Merkle block are kept so the first kept
    record's link and every kept record's inclusion proof check as before.
    """
    from spark_slurm.head.replay import parse_time  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.head.retention import prune as run_prune  # noqa: PLC0415

    report = run_prune(db, parse_time(before, "--before"), archive)
    if as_json:
        echo_json(report.to_json())
        return
    for n in report.nodes:
        click.echo(f"{n.node:<16} removed {n.removed} records, first kept seq {n.first_seq}"
                   + (f", {n.archived} archived" if archive is not None else ""))
    for name in report.partitions:
        click.echo(f"dropped partition {name}")
    click.echo(f"pruned {report.removed} records from {report.db}")


@click.command()
@click.option("--db", "db", required=True, help=DB_HELP)
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="New (or empty) directory to write the backup into.")
@click.option("--witness-state", "witness_state",
              type=click.Path(file_okay=False, path_type=Path),
              help="Witness state directory to back up too (under its lock).")
@click.option("--keys", "keys", type=click.Path(file_okay=False, path_type=Path),
              help="Trust directory of node keys to back up too (modes kept).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backup(*, db: str, out: Path, witness_state: Path | None, keys: Path | None,
           as_json: bool) -> None:
    """Back up the cluster store, witness state and keys, consistently, while merges run.

    SQLite: an online backup; PostgreSQL: pg_dump. A manifest with every file's
    SHA-256 is written last; `sparkctl restore` checks it.
    """
    from spark_slurm.head.backup import backup as run_backup  # noqa: PLC0415 (lazy CLI)

    report = run_backup(db, out, witness_state=witness_state, keys=keys)
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(f"backed up {len(report.files)} files ({len(report.nodes)} nodes) to "
                   f"{report.path}")


@click.command()
@click.option("--from", "source", required=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Backup directory (sparkctl backup --out).")
@click.option("--db", "db", required=True, help=DB_HELP + " Restored into.")
@click.option("--witness-state", "witness_state",
              type=click.Path(file_okay=False, path_type=Path),
              help="Where to restore the witness state.")
@click.option("--keys", "keys", type=click.Path(file_okay=False, path_type=Path),
              help="Where to restore the trust directory.")
@click.option("--force", is_flag=True, help="Replace a store or directory that holds data.")
def restore(*, source: Path, db: str, witness_state: Path | None, keys: Path | None,
            force: bool) -> None:
    """Restore a backup after checking every file against its manifest.

    Refuses a damaged or incomplete backup (exit 2), and never replaces a store or
    directory holding anything without --force.
    """
    from spark_slurm.head.backup import restore as run_restore  # noqa: PLC0415 (lazy CLI)

    manifest = run_restore(source, db, witness_state=witness_state, keys=keys, force=force)
    click.echo(f"restored {len(manifest.get('files', {}))} files from {source} "
               f"({len(manifest.get('nodes', {}))} nodes)")


@click.command()
@click.option("--state", "state", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Witness state directory (witnessed checkpoints, witness key).")
@click.option("--keys", "keys", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of <node>.pub (default: STATE/keys).")
@click.option("--proof", "proof", type=click.Path(dir_okay=False, path_type=Path),
              help="Consistency proof from the last witnessed size (hex or base64 lines).")
@click.option("--ledger", "ledger", type=click.Path(dir_okay=False, path_type=Path),
              help="Node ledger snapshot to compute the consistency proof from.")
@click.option("--db", "db", help=DB_HELP + " Also record the cosigned checkpoint there.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
def witness(*, state: Path, keys: Path | None, proof: Path | None, ledger: Path | None,
            db: str | None, as_json: bool, checkpoint: Path) -> None:
    """Verify a node's latest checkpoint against the last witnessed one and cosign it.

    Refuses (exit 1) a bad signature, an unknown key, a smaller size (ROLLBACK) or a
    checkpoint not consistent with the witnessed one (FORK). Prints the cosigned note.
    With --db, the cosigned checkpoint is also kept in the cluster store, where the
    next merge and every audit check the node against it.
    """
    from spark_slurm.head.witness import witness_file  # noqa: PLC0415 (lazy CLI)

    result = witness_file(state, checkpoint, keys, proof, ledger, db=db)
    if as_json:
        echo_json({"origin": result.origin, "size": result.size,
                   "previous_size": result.previous_size, "status": result.status,
                   "checkpoint": result.text})
    else:
        click.echo(result.text, nl=False)
