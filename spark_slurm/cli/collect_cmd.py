"""`sparkctl collect`: the head node fetches node ledgers (ssh or a shared dir), witnesses
their checkpoints and merges them; the library is `spark_slurm.head.collect`."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from spark_slurm.cli.output import echo_json
from spark_slurm.errors import CollectFailed, InputError


@click.command()
@click.option("--node", "nodes", multiple=True, help="A node to collect. Repeatable.")
@click.option("--nodes-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Node list, one name per line (# comments). Include the slurmctld host: "
                   "its ledger holds the submit-time denials.")
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the copies (segments or snapshots) land on the head node "
                   "(DEST/<node>.db).")
@click.option("--ssh", "ssh", default="ssh -o BatchMode=yes -o ConnectTimeout=10",
              show_default=True, help="ssh command (key-based, no prompts).")
@click.option("--shared", type=click.Path(file_okay=False, path_type=Path),
              help="Instead of ssh: copy DIR/<node>.db, a snapshot each node wrote there.")
@click.option("--ledger", "remote_ledger", default="/var/lib/spark/ledger.db",
              show_default=True, help="The live ledger's path on the nodes.")
@click.option("--remote-sparkctl", default="sparkctl", show_default=True,
              help="sparkctl on the nodes.")
@click.option("--socket", "remote_socket", default="/run/spark/sparkd.sock",
              show_default=True, help="sparkd's socket on the nodes (its clock is read).")
@click.option("--keys", type=click.Path(file_okay=False, path_type=Path),
              help="Trusted node keys (<node>.pub, <node>.hmac), as merge and witness take.")
@click.option("--witness-state", type=click.Path(file_okay=False, path_type=Path),
              help="Witness state: merge checks against it; --cosign adds to it.")
@click.option("--cosign", is_flag=True,
              help="Witness and cosign each node's newest checkpoint (every 15 minutes).")
@click.option("--into", type=click.Path(dir_okay=False, path_type=Path),
              help="Merge the fresh copies into this cluster ledger (nightly).")
@click.option("--max-skew", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds a node daemon's clock may differ from this host's.")
@click.option("--parallel", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Nodes collected at once.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds one node's fetch may take.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def collect(*, nodes: tuple[str, ...], nodes_file: Path | None, dest: Path, ssh: str,
            shared: Path | None, remote_ledger: str, remote_sparkctl: str, remote_socket: str,
            keys: Path | None, witness_state: Path | None, cosign: bool, into: Path | None,
            max_skew: float, parallel: int, timeout: float, as_json: bool) -> None:
    """Fetch what is new of every node's ledger, then witness (--cosign) and merge (--into).

    Over ssh, a node the head already holds streams back a segment (`sparkctl
    ledger export --after SEQ --proof-from SIZE`): its records since the last
    merge (or since what the witness saw), its newest checkpoint and the proof
    from the witnessed one. A node not held yet, or a plain fetch, sends an online
    snapshot of its whole ledger. The daemon is never disturbed; its clock is
    compared with this host's. A node that cannot be reached, a refused
    checkpoint, a merge finding or a clock off by more than --max-skew is reported
    (exit 1); the other nodes are collected and merged regardless.
    """
    from spark_slurm.head.collect import (  # noqa: PLC0415 (lazy CLI)
        SharedTransport,
        SshTransport,
        Transport,
        collect,
        read_node_list,
    )

    names = list(nodes) + (read_node_list(nodes_file) if nodes_file else [])
    if not names:
        raise InputError("collect: name the nodes (--node or --nodes-file)")
    transport: Transport
    if shared is not None:
        transport = SharedTransport(shared)
    else:
        argv = shlex.split(ssh)
        if not argv:
            raise InputError("collect: --ssh is empty")
        transport = SshTransport(argv, remote_ledger, remote_sparkctl, remote_socket, timeout)
    report = collect(names, transport, dest, keys_dir=keys, witness_state=witness_state,
                     cosign=cosign, into=into, max_skew_s=max_skew, parallel=parallel)
    if as_json:
        echo_json(report.to_json())
    else:
        for n in report.nodes:
            if not n.fetched:
                click.echo(f"{n.node:<16} NOT COLLECTED: {n.error}")
                continue
            clock = n.clock.text() if n.clock else f"unknown ({n.clock_error or 'not read'})"
            line = (f"{n.node:<16} {n.bytes / 1024:.0f} KiB in {n.seconds:.1f} s, "
                    f"clock {clock}")
            if n.witness or n.witness_error:
                line += f", witness {n.witness or 'REFUSED'}"
            click.echo(line)
        if report.merge is not None:
            for r in report.merge.results:
                click.echo(f"merged {r.node or r.source}: +{r.appended} records, head seq "
                           f"{'-' if r.head_seq is None else r.head_seq}")
    for problem in report.problems:
        click.echo(problem, err=True)
    if not report.ok:
        raise CollectFailed(f"collect: {len(report.problems)} problem(s) "
                            "(the healthy nodes were collected)")
