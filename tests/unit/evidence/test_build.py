"""Making bundles: from kept checkpoint files, signed by a node key; and every way it
can be refused (unknown job, nothing cosigned, records newer than the checkpoint)."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest

from spark_slurm.cli import run
from spark_slurm.clock import ManualClock
from spark_slurm.errors import EvidenceError, UnknownJob
from spark_slurm.evidence import (
    Pins,
    Signer,
    make_evidence,
    verify_bundle,
    witness_from_files,
    witness_from_state,
)
from spark_slurm.head.witness import latest
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_public_key, load_signing_key
from tests.unit.evidence.conftest import World, bundle_of, shell_verify
from tests.unit.head.builders import write_job


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run(list(args))
    return code, out.getvalue(), err.getvalue()


def test_kept_checkpoint_files_and_a_node_signed_statement(world: World) -> None:
    kept = world.root / "n1.cosigned"
    cp = latest(world.witness, "spark/spark/n1")
    assert cp is not None
    kept.write_text(cp.text)
    witness = witness_from_files([kept], world.witness / "witness.pub")
    signer = Signer(load_signing_key(world.root / "keys-n1" / "node.key"))
    out = world.root / "by-node.evidence"
    summary = make_evidence(world.n1, "100", out, witness=witness, signer=signer,
                            clock=world.clock)
    assert summary.issuer == "spark/spark/n1" and summary.source == "node"
    pins = Pins(witness=load_public_key(world.witness / "witness.pub"),
                issuer=load_public_key(world.trust / "n1.pub"),
                nodes=[load_public_key(world.trust / "n1.pub")])
    assert verify_bundle(out, pins).ok
    code, text = shell_verify(out, "--witness-pub", str(world.witness / "witness.pub"),
                              "--issuer-pub", str(world.trust / "n1.pub"),
                              "--node-pub", str(world.trust / "n1.pub"))
    assert code == 0 and "pinned witness, issuer, nodes" in text, text
    # the same through the CLI
    code, stdout, err = _cli("evidence", "100", "--db", str(world.n1), "--out",
                             str(world.root / "cli.evidence"), "--checkpoint", str(kept),
                             "--witness-pub", str(world.witness / "witness.pub"),
                             "--sign-key", str(world.root / "keys-n1" / "node.key"), "--json")
    assert code == 0, err
    assert json.loads(stdout)["issuer"] == "spark/spark/n1"


def test_cli_makes_and_checks_a_bundle_from_the_witness_state(world: World) -> None:
    out = world.root / "job.evidence"
    code, stdout, err = _cli("evidence", "100", "--db", str(world.merged), "--out", str(out),
                             "--witness-state", str(world.witness))
    assert code == 0, err
    assert "statement signed by witness/" in stdout and "n1 (checkpoint size" in stdout
    code, stdout, _ = _cli("verify-evidence", str(out), "--witness-pub",
                           str(world.witness / "witness.pub"))
    assert code == 0 and "ok, job 100" in stdout


def test_refusals_name_the_problem(world: World) -> None:
    witness, signer = witness_from_state(world.witness)
    with pytest.raises(UnknownJob):
        make_evidence(world.merged, "999", world.root / "x", witness=witness, signer=signer)
    assert not (world.root / "x").exists()
    # records newer than the cosigned checkpoint cannot be proven yet
    grown = world.root / "n1-grown.db"
    shutil.copy(world.n1, grown)
    with Ledger.open(grown, None, load_signing_key(world.root / "keys-n1" / "node.key"),
                     node="n1", clock=ManualClock(world.clock.now_ns())) as led:
        write_job(led, world.clock, "n1", "300", [0], {0: 5})
    with pytest.raises(EvidenceError, match="newer than the cosigned checkpoint"):
        make_evidence(grown, "300", world.root / "y", witness=witness, signer=signer)
    # a node the witness never cosigned
    other = world.root / "bare-witness"
    other.mkdir()
    for name in ("witness.pub", "witness.name", "witness.key"):
        shutil.copy(world.witness / name, other / name)
    (other / "witness.key").chmod(0o600)
    bare, bare_signer = witness_from_state(other)
    with pytest.raises(EvidenceError, match="no checkpoint of spark/spark/n1 cosigned"):
        make_evidence(world.n1, "100", world.root / "z", witness=bare, signer=bare_signer)
    code, _, err = _cli("evidence", "100", "--db", str(world.n1), "--out",
                        str(world.root / "w"), "--checkpoint", str(world.n1))
    assert code == 2 and "needs cosigned checkpoints" in err
    code, _, err = _cli("evidence", "100", "--db", str(world.n1), "--out",
                        str(world.root / "w"), "--witness-state", str(world.root / "nowhere"))
    assert code == 2 and "not a witness state directory" in err


def test_rebuilding_replaces_the_bundle_atomically(world: World) -> None:
    first = bundle_of(world, world.n2, "n2.evidence")
    size = first.stat().st_size
    again = bundle_of(world, world.n2, "n2.evidence")
    assert again == first and first.stat().st_size == size
    assert verify_bundle(first).ok
    assert sorted(p.name for p in world.root.glob(".n2.evidence*")) == []
