"""Backup and restore of the head node: cluster store, witness state and node keys.

A restored head node must carry on exactly where the backed-up one stood: audits
verify, the next merge appends only what is new, the witness accepts the node's
next checkpoint (and still refuses a rollback). A damaged backup is refused.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.errors import HeadDbError, WitnessError
from spark_slurm.head.audit import audit_job
from spark_slurm.head.backup import backup, restore
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import merge_ledgers, positions
from spark_slurm.head.witness import witness_checkpoint
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from tests.unit.head.builders import write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import dump

pytestmark = pytest.mark.both_stores


def newest_checkpoint(ledger: Path) -> str:
    conn = sqlite3.connect(ledger)
    try:
        return str(conn.execute("SELECT text FROM checkpoint ORDER BY id DESC").fetchone()[0])
    finally:
        conn.close()


def test_a_restored_head_node_carries_on(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "witness"
    keys = KeyRing.load(cluster.trust)
    for ledger in (cluster.n1, cluster.n2):
        witness_checkpoint(state, newest_checkpoint(ledger), keys)
    assert merge_ledgers(cluster.db, [str(cluster.n1), str(cluster.n2)], keys_dir=cluster.trust,
                         witness_state=state).ok
    out = tmp_path / "backup"
    report = backup(cluster.db, out, witness_state=state, keys=cluster.trust)
    assert set(report.nodes) == {"n1", "n2"} and "manifest.json" in os.listdir(out)
    assert stat.S_IMODE((out / "keys" / "n1.hmac").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "witness" / "witness.key").stat().st_mode) == 0o600
    target = cluster.another_store("restored")
    new_state, new_keys = tmp_path / "witness2", tmp_path / "trust2"
    restore(out, target, witness_state=new_state, keys=new_keys)
    assert dump(target) == dump(cluster.db)
    assert audit_job(target, "100", keys_dir=new_keys).ok
    with Ledger.open(cluster.n1, load_hmac_key(tmp_path / "keys-n1" / "hmac.key"),
                     load_signing_key(tmp_path / "keys-n1" / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        write_job(led, cluster.clock, "n1", "300", [0], {0: 1})
        led.checkpoint()
    held = {p.name: p.head_seq for p in positions(target)}
    merged = merge_ledgers(target, [str(cluster.n1), str(cluster.n2)], keys_dir=new_keys,
                           witness_state=new_state)
    assert merged.ok and merged.results[0].read == merged.appended > 0
    assert merged.results[0].head_seq is not None and held["n1"] is not None
    accepted = witness_checkpoint(new_state, newest_checkpoint(cluster.n1),
                                  KeyRing.load(new_keys), ledger=cluster.n1)
    assert accepted.status == "accepted" and accepted.previous_size is not None
    old = (out / "witness" / "checkpoints" / "spark_spark_n1.txt").read_text()
    with pytest.raises(WitnessError, match="ROLLBACK"):
        witness_checkpoint(new_state, old.split("\n\n")[0] + "\n\n" + old.split("\n\n")[1],
                           KeyRing.load(new_keys))


def test_a_damaged_or_partial_backup_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    assert merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust).ok
    out = tmp_path / "backup"
    backup(cluster.db, out, keys=cluster.trust)
    (out / "keys" / "n1.pub").write_text("swapped")
    with pytest.raises(HeadDbError, match=r"damaged: keys/n1\.pub"):
        restore(out, cluster.another_store("r"), keys=tmp_path / "k")
    (out / "manifest.json").unlink()
    with pytest.raises(HeadDbError, match="not a complete backup"):
        restore(out, cluster.another_store("r2"))


def test_nothing_is_overwritten_without_force(cluster: Cluster, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust).ok
    out = tmp_path / "backup"
    assert run(["backup", "--db", cluster.db, "--out", str(out), "--keys",
                str(cluster.trust)]) == 0
    assert run(["backup", "--db", cluster.db, "--out", str(out)]) == 2  # not empty
    assert run(["restore", "--from", str(out), "--db", cluster.db]) == 2  # holds a store
    err = capsys.readouterr().err
    assert "--force" in err and "Traceback" not in err
    assert run(["restore", "--from", str(out), "--db", cluster.db, "--keys",
                str(cluster.trust), "--force"]) == 0
    assert audit_job(cluster.db, "100").ok
