"""`sparkctl merge` and `sparkctl witness`: the head node's nightly and 15-minute duties."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from spark_slurm.cli.output import echo_json
from spark_slurm.errors import MergeFailed


@click.command()
@click.option("--into", "into", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Merged cluster ledger (created when missing).")
@click.option("--keys", "keys", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of <node>.pub / <node>.hmac the head node trusts.")
@click.option("--witness-state", "witness_state",
              type=click.Path(file_okay=False, path_type=Path),
              help="Witness state directory: check nodes against what it cosigned.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes that copy and verify node ledgers while the merge writes "
                   "(default: up to 4, one per CPU, for 50,000 rows or more; 1: none).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.argument("ledgers", nargs=-1, required=True)
def merge(*, into: Path, keys: Path | None, witness_state: Path | None, progress: bool | None,
          workers: int | None, as_json: bool, ledgers: tuple[str, ...]) -> None:
    """Verify node ledger snapshots (PATH or NODE=PATH) and append their new records.

    Idempotent; every problem is a finding (GAP, FORK, ROLLBACK, DUPLICATE, REORDER,
    TAMPERED, FOREIGN_ORIGIN, UNKNOWN_KEY, EPOCH_GAP) naming node and seq. Exit 1
    when any node had findings; the healthy nodes are merged regardless.
    """
    from spark_slurm.head.merge import count_records, merge_ledgers  # noqa: PLC0415 (lazy CLI)

    show = sys.stderr.isatty() if progress is None else progress
    if show:
        with click.progressbar(length=count_records(ledgers), label="merging", file=sys.stderr,
                               show_pos=True) as bar:
            summary = merge_ledgers(into, ledgers, keys_dir=keys, witness_state=witness_state,
                                    progress=bar.update, workers=workers)
    else:
        summary = merge_ledgers(into, ledgers, keys_dir=keys, witness_state=witness_state,
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
        click.echo(f"merged {summary.appended} new records into {into}")
    if not summary.ok:
        bad = [r.node or r.source for r in summary.results if not r.ok]
        raise MergeFailed(f"merge: findings or errors on {', '.join(bad)} (healthy nodes merged)")


@click.command()
@click.option("--state", "state", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Witness state directory (witnessed checkpoints, witness key).")
@click.option("--keys", "keys", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of <node>.pub (default: STATE/keys).")
@click.option("--proof", "proof", type=click.Path(dir_okay=False, path_type=Path),
              help="Consistency proof from the last witnessed size (hex or base64 lines).")
@click.option("--ledger", "ledger", type=click.Path(dir_okay=False, path_type=Path),
              help="Node ledger snapshot to compute the consistency proof from.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
def witness(*, state: Path, keys: Path | None, proof: Path | None, ledger: Path | None,
            as_json: bool, checkpoint: Path) -> None:
    """Verify a node's latest checkpoint against the last witnessed one and cosign it.

    Refuses (exit 1) a bad signature, an unknown key, a smaller size (ROLLBACK) or a
    checkpoint not consistent with the witnessed one (FORK). Prints the cosigned note.
    """
    from spark_slurm.head.witness import witness_file  # noqa: PLC0415 (lazy CLI)

    result = witness_file(state, checkpoint, keys, proof, ledger)
    if as_json:
        echo_json({"origin": result.origin, "size": result.size,
                   "previous_size": result.previous_size, "status": result.status,
                   "checkpoint": result.text})
    else:
        click.echo(result.text, nl=False)
