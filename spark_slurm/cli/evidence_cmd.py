"""`sparkctl evidence JOBID` and `sparkctl verify-evidence BUNDLE`: portable proof of a job."""

from __future__ import annotations

from pathlib import Path

import click

from spark_slurm.cli.output import echo_json
from spark_slurm.errors import EvidenceInvalid, InputError

_FILE = click.Path(dir_okay=False, path_type=Path)
_DIR = click.Path(file_okay=False, path_type=Path)
DEFAULT_DB = Path("/var/lib/spark/cluster.db")  # as `sparkctl audit`
DEFAULT_WITNESS = Path("/var/lib/spark/witness")  # as contrib/collect-ledgers.sh


@click.command()
@click.argument("job_id")
@click.option("--db", "db", type=_FILE, default=DEFAULT_DB, show_default=True,
              help="The merged cluster ledger, or a node ledger (or its snapshot).")
@click.option("--out", "out", required=True, type=_FILE, help="The bundle file to write.")
@click.option("--witness-state", "witness_state", type=_DIR,
              help="The witness state directory: its cosigned checkpoints, and its key "
                   f"signs the bundle's statement (default {DEFAULT_WITNESS} when neither "
                   "this nor --checkpoint is given).")
@click.option("--checkpoint", "checkpoints", type=_FILE, multiple=True,
              help="A cosigned checkpoint note (instead of --witness-state); repeatable.")
@click.option("--witness-pub", "witness_pub", type=_FILE,
              help="The witness's public key (PEM), with --checkpoint.")
@click.option("--sign-key", "sign_key", type=_FILE,
              help="Ed25519 key (PEM, mode 0600) that signs the statement (default: the "
                   "witness key of --witness-state).")
@click.option("--sign-name", "sign_name", default=None,
              help="The signing key's name (default: the witness or node it belongs to).")
@click.option("--keys", "keys", type=_DIR,
              help="Trust store of <node>.pub / <node>.hmac, as for merge and audit.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
def evidence(*, job_id: str, db: Path, out: Path, witness_state: Path | None,
             checkpoints: tuple[Path, ...], witness_pub: Path | None, sign_key: Path | None,
             sign_name: str | None, keys: Path | None, as_json: bool) -> None:
    """Write one file with a job's PERs and everything needed to check them offline.

    The bundle (an SQLite file, docs/evidence.md) holds the records `sparkctl audit`
    shows for the job and the policy records its decisions cite, an RFC 6962
    inclusion proof for each against its node's checkpoint signed by the node and
    cosigned by the witness, the public keys, the policy snapshot, and a statement
    signed by the issuer listing all of it. Check it with `sparkctl verify-evidence`
    or contrib/verify-evidence.sh (sqlite3, sha256sum, openssl only).
    """
    from spark_slurm.evidence import (  # noqa: PLC0415 (lazy CLI)
        Signer,
        make_evidence,
        witness_from_files,
        witness_from_state,
    )
    from spark_slurm.ledger.keys import load_signing_key  # noqa: PLC0415

    if witness_state is not None and (checkpoints or witness_pub is not None):
        raise InputError("give --witness-state, or --checkpoint with --witness-pub, not both")
    if witness_state is None and not checkpoints and witness_pub is None:
        witness_state = DEFAULT_WITNESS
    if witness_state is not None:
        witness, signer = witness_from_state(witness_state)
    elif checkpoints and witness_pub is not None:
        witness, signer = witness_from_files(checkpoints, witness_pub), None
    else:
        raise InputError("evidence needs cosigned checkpoints: --witness-state DIR, or "
                         "--checkpoint FILE... with --witness-pub FILE (both)")
    if sign_key is not None:
        signer = Signer(load_signing_key(sign_key), sign_name)
    elif signer is not None and sign_name is not None:
        signer = Signer(signer.key, sign_name)
    if signer is None:
        raise InputError("--checkpoint needs --sign-key FILE (who signs the bundle's statement)")
    summary = make_evidence(db, job_id, out, witness=witness, signer=signer, keys_dir=keys)
    if as_json:
        echo_json(summary.to_json())
        return
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary.kinds.items()))
    nodes = ", ".join(f"{n} (checkpoint size {s})" for n, s in sorted(summary.checkpoints.items()))
    click.echo(f"{out}: job {job_id}, {summary.records} records ({kinds}) from {nodes}; "
               f"cosigned by {summary.witness}, statement signed by {summary.issuer}")


@click.command("verify-evidence")
@click.argument("bundle", type=_FILE)
@click.option("--witness-pub", "witness_pub", type=_FILE,
              help="The witness public key (PEM) you hold: the bundle's must match.")
@click.option("--issuer-pub", "issuer_pub", type=_FILE,
              help="The issuer public key (PEM) you hold: the bundle's must match.")
@click.option("--node-pub", "node_pubs", type=_FILE, multiple=True,
              help="A node public key (PEM) you hold; with any given, every node key in "
                   "the bundle must be one of them. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_evidence(*, bundle: Path, witness_pub: Path | None, issuer_pub: Path | None,
                    node_pubs: tuple[Path, ...], as_json: bool) -> None:
    """Check an evidence bundle offline; exit 0 valid, 1 invalid (naming what failed).

    Checks the issuer's signed statement, each checkpoint's node signature and
    witness cosignature, each record's bytes, chain hash and inclusion proof, that
    no record was dropped or added, and the policy snapshot. Without pinned keys
    the bundle's own keys are used and their ids printed, to compare with yours.
    """
    from spark_slurm.evidence import Pins, verify_bundle  # noqa: PLC0415 (lazy CLI)
    from spark_slurm.ledger.keys import load_public_key  # noqa: PLC0415

    pins = Pins(witness=load_public_key(witness_pub) if witness_pub else None,
                issuer=load_public_key(issuer_pub) if issuer_pub else None,
                nodes=[load_public_key(p) for p in node_pubs])
    report = verify_bundle(bundle, pins)
    if as_json:
        echo_json(report.to_json())
    elif report.ok:
        keys = "; ".join(f"{name}: {what}" for name, what in sorted(report.keys.items()))
        pinned = ", ".join(report.pinned) or "none (compare the key ids with your own copies)"
        click.echo(f"{bundle}: ok, job {report.job_id}, {report.records} records from "
                   f"{', '.join(report.nodes)}; keys {keys}; pinned {pinned}")
    if not report.ok:
        assert report.failed_part is not None and report.reason is not None
        raise EvidenceInvalid(f"{bundle}: {report.failed_part}", report.reason)
