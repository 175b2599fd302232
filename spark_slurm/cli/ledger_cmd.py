"""`sparkctl verify` and `sparkctl ledger ...`: thin wrappers over spark_slurm.ledger."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import click

from spark_slurm.cli.daemon_cmd import SOCKET_OPTION
from spark_slurm.cli.output import echo_json, echo_table
from spark_slurm.daemon import client
from spark_slurm.errors import CheckFailed, LedgerError
from spark_slurm.ledger.keys import keygen as make_keys
from spark_slurm.ledger.reader import latest_checkpoint, read_records
from spark_slurm.ledger.snapshot import snapshot as take
from spark_slurm.ledger.verify import verify_files


@click.command("verify")
@click.argument("ledgers", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="HMAC key file (K[0], hmac.key) to check every record's MAC.")
@click.option("--pubkey", "pubkey_file", type=click.Path(dir_okay=False),
              help="Node public key (node.pub) the ledger must be signed with.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="A kept checkpoint file; detects truncation and forks. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report per ledger.")
def verify(ledgers: tuple[str, ...], key_file: str | None, pubkey_file: str | None,
           checkpoints: tuple[str, ...], as_json: bool) -> None:
    """Verify ledger files: chain, hashes, MACs, signed checkpoints.

    Exit 0 when every ledger verifies, 1 when one fails (the first bad seq and
    why are printed), 2 when an input cannot be used (missing, not a ledger,
    unknown schema version, wrong key).
    """
    reports = verify_files(list(ledgers), key_file, pubkey_file, list(checkpoints))
    if as_json:
        echo_json([dataclasses.asdict(r) for r in reports])
    else:
        for report in reports:
            if report.ok:
                click.echo(report.summary())
    failed = [r.summary() for r in reports if not r.ok]
    if failed:
        raise CheckFailed("; ".join(failed))


@click.group("ledger")
def ledger() -> None:
    """Inspect, copy and key the per-node Power Event Record ledger."""


def _time(ns: int) -> str:
    stamp = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@ledger.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--job", "job_id", help="Only records of this Slurm job id.")
@click.option("--kind", "kinds", multiple=True, help="Only records of this kind. Repeatable.")
@click.option("--since", type=click.IntRange(min=0), help="Only records with seq >= SEQ.")
@click.option("--json", "as_json", is_flag=True, help="Print records as JSON.")
def show(path: str, job_id: str | None, kinds: tuple[str, ...], since: int | None,
         as_json: bool) -> None:
    """List the records of a ledger (read-only; safe on a live ledger)."""
    records = list(read_records(path, job_id=job_id, since=since, kinds=kinds or None))
    if as_json:
        echo_json([{"seq": r.seq, "time_ns": r.time_ns, "kind": r.kind, "job_id": r.job_id,
                    "body": r.body, "prev_hash": r.prev_hash, "hash": r.hash, "mac": r.mac,
                    "key_id": r.key_id} for r in records])
        return
    echo_table(["seq", "time (UTC)", "kind", "job", "hash"],
               [[r.seq, _time(r.time_ns), r.kind, r.job_id or "-", r.hash[:16]]
                for r in records])


@ledger.command("snapshot")
@click.argument("path", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(dir_okay=False))
def snapshot(path: str, dest: str) -> None:
    """Copy a live ledger to DEST with SQLite's online backup (never overwrites)."""
    snap = take(path, dest)
    click.echo(f"{snap.dest}: {snap.count} records, head {snap.head}")


@ledger.command("export")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--after", "after", type=click.IntRange(min=-1), default=-1, show_default=True,
              help="Ship the records with seq > AFTER (the head node's position for this "
                   "node: `sparkctl positions --seq`); -1 ships everything.")
@click.option("--until", "until", type=click.IntRange(min=0),
              help="Stop at this seq (an archive of one range; default: the newest).")
@click.option("--proof-from", "proof_from", type=click.IntRange(min=0),
              help="Also carry a consistency proof from this tree size (the witness's last "
                   "cosigned size for this node) to the newest checkpoint.")
@click.option("--out", "out", required=True,
              help="Segment file to write (replaced atomically), or - for stdout.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON "
              "(on stderr with --out -).")
def export(path: str, *, after: int, until: int | None, proof_from: int | None, out: str,
           as_json: bool) -> None:
    """Write the records after a seq, and the checkpoints covering them, to a segment.

    Read-only and safe on a live ledger; costs what the new records cost. The head
    node merges segments like ledger snapshots (`sparkctl merge --db DB SEGMENT`),
    and its witness checks the newest checkpoint from the segment alone: it carries
    that checkpoint, the node's key records and, with --proof-from, the proof.
    """
    import sys  # noqa: PLC0415

    from spark_slurm.ledger.segment import export_segment  # noqa: PLC0415 (lazy CLI)

    seg = export_segment(path, sys.stdout.buffer if out == "-" else out, after, until,
                         proof_from)
    if as_json:
        echo_json(seg.to_json(), err=out == "-")
    elif out != "-":
        click.echo(f"{seg.path}: {seg.rows} records after seq {seg.after} "
                   f"({seg.checkpoints} checkpoints, {seg.bytes} bytes) of {seg.node}")


@ledger.command("prune")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--before", "before", help="Cut before the first record written at or after "
              "this time: ISO-8601 (UTC if no zone), Unix seconds or Unix ns.")
@click.option("--before-seq", "before_seq", type=click.IntRange(min=1),
              help="Cut at or before this seq instead.")
@click.option("--archive", "archive", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="New segment file the removed records go to first (never overwritten).")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="Only say where the cut would fall and what would go.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def prune(path: str, *, before: str | None, before_seq: int | None, archive: Path,
          dry_run: bool, as_json: bool) -> None:
    """Archive a node ledger's old records to a segment, then remove them.

    The cut falls on a multiple of 16384 records, before the head and at or below
    the newest checkpoint. Kept: the genesis, key and policy records, and what sparkd
    resumes from (ingest cursors, each GPU's governed limit); the stored Merkle
    subtrees and an inclusion proof for each kept record anchor the cut, so
    `sparkctl verify` still checks everything kept. Merge
    the archive on the head node (`sparkctl merge`) before pruning past what it holds.
    """
    from spark_slurm.head.replay import parse_time  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.ledger.prune import prune_ledger  # noqa: PLC0415

    if (before is None) == (before_seq is None):
        raise click.UsageError("give one of --before TIME and --before-seq SEQ")
    done = prune_ledger(path, archive, before_seq=before_seq,
                        before_ns=None if before is None else parse_time(before, "--before"),
                        dry_run=dry_run)
    if as_json:
        echo_json(done.to_json())
    elif dry_run and done.why:
        click.echo(f"{done.path}: nothing would be pruned: {done.why}")
    elif dry_run:
        click.echo(f"{done.path}: would cut at seq {done.cut}: remove {done.removed} records "
                   f"(keep {done.kept}) and {done.checkpoints_removed} checkpoints, archiving "
                   f"{done.cut - done.previous} records in {archive}")
    elif done.why:
        click.echo(f"{done.path}: nothing pruned: {done.why}")
    else:
        click.echo(f"{done.path}: cut at seq {done.cut}: removed {done.removed} records "
                   f"(kept {done.kept}), {done.archived} archived in {done.archive}")


@ledger.command("checkpoint")
@click.argument("path", type=click.Path(dir_okay=False))
def checkpoint(path: str) -> None:
    """Print the newest signed checkpoint kept in a ledger (to keep elsewhere)."""
    cp = latest_checkpoint(path)
    if cp is None:
        raise LedgerError(f"{path}: ledger holds no checkpoint yet")
    click.echo(cp.text, nl=False)


@ledger.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
def keygen(directory: str) -> None:
    """Write hmac.key (K[0]), node.key and node.pub into DIRECTORY (never overwrites)."""
    files = make_keys(directory)
    for path in (files.hmac_key, files.signing_key, files.public_key):
        click.echo(str(path))


@ledger.command("rotate-key")
@SOCKET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")
def rotate_key(socket_path: Path, as_json: bool) -> None:
    """Give the running sparkd's ledger a new signing key (root only).

    The ledger records the new key endorsed by the old one, the key file is
    replaced (the old private key is gone) and a checkpoint is signed with the
    new key. Install the new public key in the head node's trust directory and
    with the witness.
    """
    reply = client.rotate_key(socket_path)
    if as_json:
        echo_json(reply)
        return
    click.echo(f"signing key {reply['prev_key_id']} -> {reply['key_id']} (PER seq "
               f"{reply['seq']}, checkpoint at size {reply['checkpoint_size']})")
    click.echo(f"new public key: {reply['public_key']}")
