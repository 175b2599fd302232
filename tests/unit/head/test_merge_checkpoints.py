"""The node's own signed checkpoints among the new records: one whose root or head
hash the records do not have is a FORK (nothing merged), one of another origin is not
taken, each one past the ledger's end is a ROLLBACK, and one past the first bad
record is left to that record's finding."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.head.merge import positions
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.checkpoint import origin_for, parse_checkpoint, sign_checkpoint
from spark_slurm.ledger.keys import load_signing_key
from tests.unit.head import tamper
from tests.unit.head.builders import k0, merge, more, write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import query

pytestmark = pytest.mark.both_stores


def exact(c: Cluster) -> tuple[list[tuple[str, str, int | None, str]], int | None]:
    """(findings, head seq) of merging n1."""
    summary = merge(c, c.n1)
    return ([(f.code, f.node, f.seq, f.detail) for f in summary.findings],
            positions(c.db, ["n1"])[0].head_seq)


def resign(c: Cluster, *, root: bytes | None = None, head_hash: str | None = None,
           origin: str | None = None) -> int:
    """n1's last checkpoint replaced by one its key signed with another root, head or
    origin; its size."""
    with closing(sqlite3.connect(c.n1)) as conn:
        (text,) = conn.execute("SELECT text FROM checkpoint ORDER BY id DESC").fetchone()
    cp = parse_checkpoint(str(text))
    key = load_signing_key(c.root / "keys-n1" / "node.key")
    new = sign_checkpoint(origin or cp.origin, cp.size, root or cp.root,
                          head_hash or cp.head_hash, key)
    tamper.sql(c.n1, "UPDATE checkpoint SET text = ? WHERE id = (SELECT max(id) FROM"
               " checkpoint)", (new.text,))
    return cp.size


@pytest.mark.parametrize("lie", ["root", "head"])
def test_an_own_checkpoint_the_records_do_not_have_is_a_fork(cluster: Cluster,
                                                              lie: str) -> None:
    size = resign(cluster, root=bytes(32)) if lie == "root" else resign(
        cluster, head_hash="00" * 32)
    assert exact(cluster) == ([
        ("FORK", "n1", None,
         f"records differ from the ledger's own signed checkpoint of size {size}")], None)


def test_an_own_checkpoint_of_another_origin_is_not_taken(cluster: Cluster) -> None:
    """Signed by the node's key, but naming another node: a finding, not a proof."""
    resign(cluster, root=bytes(32), origin=origin_for("spark", "n9"))
    size = len(tamper.rows(cluster.n1))
    found, head = exact(cluster)
    assert [(code, seq) for code, _, seq, _ in found] == [("FOREIGN_ORIGIN", None)]
    assert head == size - 1


def checkpointed_twice(c: Cluster) -> tuple[int, int]:
    """n1 with a second checkpoint past its first; their sizes."""
    keys = c.root / "keys-n1"
    with Ledger.open(c.n1, k0(c), load_signing_key(keys / "node.key"), node="n1",
                     clock=c.clock) as led:
        first = led.size
        write_job(led, c.clock, "n1", "300", [0], {0: 42})
        led.checkpoint()
        return first, led.size


def test_each_own_checkpoint_past_the_end_is_a_rollback(cluster: Cluster) -> None:
    first, second = checkpointed_twice(cluster)
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq >= ?", (first - 2,))
    size = first - 2
    assert exact(cluster) == ([
        ("ROLLBACK", "n1", size, f"ledger holds {size} records but its own checkpoint says "
         f"{cp}") for cp in (first, second)], size - 1)


def test_a_checkpoint_past_a_bad_record_does_not_hide_a_later_rollback(
        cluster: Cluster) -> None:
    """The first checkpoint covers a damaged record (its own finding says so); the
    second is past the truncated end."""
    _, second = checkpointed_twice(cluster)
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq >= ?", (second - 2,))
    tamper.sql(cluster.n1, "UPDATE per SET hash = zeroblob(32) WHERE seq = 4")
    size = second - 2
    assert exact(cluster) == ([
        ("TAMPERED", "n1", 4, "stored bytes do not hash to the stored hash"),
        ("ROLLBACK", "n1", size,
         f"ledger holds {size} records but its own checkpoint says {second}")], 3)


def test_without_the_nodes_public_key_its_checkpoints_prove_nothing(cluster: Cluster) -> None:
    """A trust store holding only n1's HMAC key: the records are checked by their MACs
    and merged; no checkpoint can be verified, so none is kept and none is a finding."""
    (cluster.trust / "n1.pub").unlink()
    size = len(tamper.rows(cluster.n1))
    assert exact(cluster) == ([], size - 1)
    with closing(open_store(cluster.db)) as store:
        assert query(store, "SELECT count(*) FROM checkpoints") == [(0,)]


@pytest.mark.parametrize("damage", ["another key", "bad signature", "unreadable"])
def test_an_own_checkpoint_that_does_not_verify_is_named_and_the_records_merge(
        cluster: Cluster, damage: str) -> None:
    """The records check out by themselves; the checkpoint proves nothing and says so."""
    with closing(sqlite3.connect(cluster.n1)) as conn:
        (text,) = conn.execute("SELECT text FROM checkpoint ORDER BY id DESC").fetchone()
    cp = parse_checkpoint(str(text))
    if damage == "another key":
        new = sign_checkpoint(cp.origin, cp.size, cp.root, cp.head_hash,
                              Ed25519PrivateKey.generate()).text
        why = ("UNKNOWN_KEY", f"checkpoint of {cp.origin} size {cp.size} is not signed by "
               "the given key")
    elif damage == "bad signature":
        new = str(text).replace(f"\n{cp.size}\n", f"\n{cp.size - 1}\n", 1)
        why = ("TAMPERED", f"checkpoint of {cp.origin} size {cp.size - 1}: bad signature")
    else:
        new = "garbage"
        why = ("TAMPERED", "unreadable checkpoint: checkpoint is not a signed note (body, "
               "blank line, signatures)")
    tamper.sql(cluster.n1, "UPDATE checkpoint SET text = ? WHERE id = (SELECT max(id) FROM"
               " checkpoint)", (new,))
    size = len(tamper.rows(cluster.n1))
    assert exact(cluster) == ([(why[0], "n1", None, why[1])], size - 1)


def test_an_unreadable_checkpoint_does_not_hide_the_next_one(cluster: Cluster) -> None:
    """The node's first checkpoint note is garbage; the later one is still checked
    against the records and kept."""
    with closing(sqlite3.connect(cluster.n1)) as conn:
        texts = [str(t) for (t,) in conn.execute("SELECT text FROM checkpoint ORDER BY id")]
    assert len(texts) >= 2
    tamper.sql(cluster.n1, "UPDATE checkpoint SET text = 'garbage' WHERE id = (SELECT min(id)"
               " FROM checkpoint)")
    size = len(tamper.rows(cluster.n1))
    assert exact(cluster) == ([("TAMPERED", "n1", None, "unreadable checkpoint: checkpoint is "
                                "not a signed note (body, blank line, signatures)")], size - 1)
    with closing(open_store(cluster.db)) as store:
        kept = query(store, "SELECT text FROM checkpoints ORDER BY size")
    assert [t for (t,) in kept] == texts[1:]


def test_a_ledger_cut_back_to_the_held_head_below_its_own_checkpoint_is_a_rollback(
        cluster: Cluster) -> None:
    """The head node holds all of n1; n1 then wrote more and checkpointed them, and
    was cut back to exactly what the head node holds: its own checkpoint says more."""
    size = len(tamper.rows(cluster.n1))
    assert merge(cluster, cluster.n1).ok
    _, second = checkpointed_twice(cluster)
    tamper.sql(cluster.n1, "DELETE FROM per WHERE seq >= ?", (size,))
    assert exact(cluster) == ([
        ("ROLLBACK", "n1", size, f"ledger holds {size} records but its own checkpoint says "
         f"{second}")], size - 1)


@pytest.mark.parametrize("lie", [False, True])
def test_a_checkpoint_listed_past_the_held_head_is_judged_by_its_signed_size(
        cluster: Cluster, lie: bool) -> None:
    """A checkpoint row whose size column was raised past the held head, while its
    signed note covers exactly what the head node holds: merge picks checkpoints by
    the column but judges the note, against the held tree and head. The node's own
    note at the held size that names another root is a FORK; an honest one lets the
    new records merge."""
    size = len(tamper.rows(cluster.n1))
    assert merge(cluster, cluster.n1).ok
    if lie:
        assert resign(cluster, root=bytes(32)) == size
    with closing(sqlite3.connect(cluster.n1)) as conn:
        (last,) = conn.execute("SELECT max(id) FROM checkpoint").fetchone()
    more(cluster, cluster.n1, "301")
    tamper.sql(cluster.n1, "UPDATE checkpoint SET size = ? WHERE id = ?", (size + 1, last))
    findings, head = exact(cluster)
    if lie:
        assert (findings, head) == ([
            ("FORK", "n1", None, "records differ from the ledger's own signed checkpoint "
             f"of size {size}")], size - 1)
    else:
        assert findings == [] and head == len(tamper.rows(cluster.n1)) - 1 > size - 1
