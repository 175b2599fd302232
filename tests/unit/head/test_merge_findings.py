"""Every finding a damaged node ledger gets, exactly: code, seq and the reason an
operator reads (`sparkctl merge` prints it; docs/head-node.md lists the codes). The
fast path and the full checks give the same."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import merge_into
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger, hmac_epochs
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster

Found = tuple[str, int, str]
WHOLE = "seq/time/kind/job columns differ from the hashed record"
CASES: list[tuple[str, list[Found]]] = [
    ("UPDATE per SET hash = randomblob(32) WHERE seq=4",
     [("TAMPERED", 4, "stored bytes do not hash to the stored hash")]),
    ("UPDATE per SET prev_hash = randomblob(32) WHERE seq=3",
     [("TAMPERED", 3, "stored bytes do not hash to the stored hash")]),
    ("UPDATE per SET mac = randomblob(32) WHERE seq=5",
     [("TAMPERED", 5, "MAC does not verify with the epoch 0 key")]),
    ("UPDATE per SET mac = NULL WHERE seq=5", [("TAMPERED", 5, "record carries no MAC")]),
    ("UPDATE per SET key_id = NULL WHERE seq=5", [("TAMPERED", 5, "record carries no MAC")]),
    ("UPDATE per SET key_id = NULL WHERE seq=0", [("TAMPERED", 0, "record carries no MAC")]),
    ("UPDATE per SET key_id = 'zz:0' WHERE seq=5",
     [("UNKNOWN_KEY", 5, "MAC key id 'zz:0' is not the node's HMAC key")]),
    ("UPDATE per SET key_id = 'garbage' WHERE seq=5",
     [("UNKNOWN_KEY", 5, "MAC key id 'garbage' is not the node's HMAC key")]),
    ("UPDATE per SET time_ns = time_ns + 1 WHERE seq=6", [("TAMPERED", 6, WHOLE)]),
    ("UPDATE per SET time_ns = 'noon' WHERE seq=4", [("TAMPERED", 4, WHOLE)]),
    ("UPDATE per SET kind = 'restore' WHERE seq=3", [("TAMPERED", 3, WHOLE)]),
    ("UPDATE per SET job_id = 'other' WHERE job_id IS NOT NULL AND seq > 2",
     [("TAMPERED", 3, WHOLE)]),
    ("UPDATE per SET job_id = 'x' WHERE seq=1 AND job_id IS NULL", [("TAMPERED", 1, WHOLE)]),
    ("UPDATE per SET kind = CAST(kind AS BLOB) WHERE seq=3",
     [("TAMPERED", 3, "a column has the wrong type")]),
    ("UPDATE per SET job_id = CAST(job_id AS BLOB) WHERE job_id IS NOT NULL",
     [("TAMPERED", 2, "a column has the wrong type")]),
    ("UPDATE per SET kind = CAST(X'FF6361' AS TEXT) WHERE seq=3",
     [("TAMPERED", 3, "a text column is not valid UTF-8")]),
    ("DELETE FROM per WHERE seq=4", [("GAP", 4, "seqs 4..4 are missing")]),
    ("DELETE FROM per WHERE seq>=4 AND seq<=6", [("GAP", 4, "seqs 4..6 are missing")]),
    ("UPDATE per SET seq = seq + 1000 WHERE seq >= 7", [("GAP", 7, "seqs 7..1006 are missing")]),
    ("DELETE FROM per WHERE seq = 4; UPDATE per SET seq = seq - 1 WHERE seq > 4",
     [("GAP", 4, "the record of seq 4 was deleted (later records renumbered)"),
      ("ROLLBACK", 17, "ledger holds 17 records but its own checkpoint says 18")]),
    ("UPDATE per SET seq = -1 WHERE seq = 4; UPDATE per SET seq = 4 WHERE seq = 5;"
     " UPDATE per SET seq = 5 WHERE seq = -1",
     [("REORDER", 4, "holds the record of seq 5, which links to a record stored after it")]),
    ("INSERT INTO per SELECT (SELECT max(seq) + 1 FROM per), time_ns, kind, job_id, body,"
     " prev_hash, hash, mac, key_id FROM per WHERE seq = 3",
     [("DUPLICATE", 18, "repeats the record of seq 3")]),
]


def findings(c: Cluster, *, fast: bool) -> list[tuple[str, str, int | None, str]]:
    into = c.another_store("fast" if fast else "full")
    with closing(open_store(into, create=True)) as store, closing(open_store(into)) as reads:
        summary = merge_into(store, reads, [str(c.n1)], KeyRing.load(c.trust),
                             clock=c.clock, fast=fast)
    return [(f.code, f.node, f.seq, f.detail) for f in summary.findings]


@pytest.mark.parametrize(("damage", "want"), CASES)
def test_each_damage_is_named_exactly(cluster: Cluster, damage: str,
                                      want: list[Found]) -> None:
    with closing(sqlite3.connect(cluster.n1)) as conn, conn:
        for statement in damage.split(";"):
            conn.execute(statement)
    expected = [(code, "n1", seq, why) for code, seq, why in want]
    assert findings(cluster, fast=True) == expected
    assert findings(cluster, fast=False) == expected


def test_a_record_rewritten_without_relinking_the_next_is_a_broken_link(
        cluster: Cluster) -> None:
    """Record 3 edited with its hash and MAC recomputed: record 4 no longer links."""
    tamper.rewrite_derived(cluster.n1, 3, relink=False,
                           k0=load_hmac_key(cluster.root / "keys-n1" / "hmac.key"))
    assert findings(cluster, fast=True) == findings(cluster, fast=False) == [
        ("TAMPERED", "n1", 4, "does not link to seq 3")]


def test_a_mac_from_an_earlier_epoch_after_a_later_one_goes_back(cluster: Cluster) -> None:
    """A record re-MACed under epoch 0's key after the node moved on to epoch 1 (what
    a thief of K[0] could do): the epochs only move forward."""
    k0 = load_hmac_key(cluster.root / "keys-n1" / "hmac.key")
    keys = cluster.root / "keys-n1"
    with Ledger.open(cluster.n1, k0, load_signing_key(keys / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        cluster.clock.advance(3600)
        last = led.append_many([("fault", {"v": 1, "node": "n1", "gpu": 0, "error": "x"}),
                                ("fault", {"v": 1, "node": "n1", "gpu": 1, "error": "y"})])[-1]
    rows = tamper.rows(cluster.n1)
    hid, epoch = str(rows[last.seq][8]).rsplit(":", 1)
    assert epoch == "1"
    tamper.sql(cluster.n1, "UPDATE per SET key_id = ?, mac = ? WHERE seq = ?",
               (f"{hid}:0", hmac_epochs.mac(k0, rows[last.seq][6]), last.seq))
    assert findings(cluster, fast=True) == findings(cluster, fast=False) == [
        ("TAMPERED", "n1", last.seq, "MAC epoch 0 goes back from epoch 1")]


@pytest.mark.parametrize("forgery", ["removed", "another epoch", "after a rotation"])
def test_a_new_epoch_without_the_seal_of_the_last_is_an_epoch_gap(cluster: Cluster,
                                                                  forgery: str) -> None:
    """The seal of epoch 0 removed (after an ordinary record, or after a key rotation,
    itself a `key` record) or made to name another epoch, and the chain rebuilt (a
    thief of K[0])."""
    k0 = load_hmac_key(cluster.root / "keys-n1" / "hmac.key")
    keys = cluster.root / "keys-n1"
    with Ledger.open(cluster.n1, k0, load_signing_key(keys / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        if forgery == "after a rotation":
            led.rotate_signing_key(Ed25519PrivateKey.generate())
        cluster.clock.advance(3600)
        led.append("fault", {"v": 1, "node": "n1", "gpu": 0, "error": "x"})
    rows = tamper.rows(cluster.n1)
    (seal,) = [i for i, r in enumerate(rows) if r[2] == "key" and b'"seal"' in r[4]]
    if forgery == "another epoch":
        env = json.loads(rows[seal][4])
        env["body"]["epoch"] = 7
        rows[seal][4] = json.dumps(env).encode()
        seal += 1
    else:
        del rows[seal]
    tamper.rewrite(cluster.n1, rows, k0)
    assert findings(cluster, fast=True) == findings(cluster, fast=False) == [
        ("EPOCH_GAP", "n1", seal, "epoch 0 ends without its seal record")]
