"""A witnessed checkpoint that covers only records the head node already holds: the
held chain must have its root (answered by a matching node checkpoint, the stored
compact range, or the stored tree), else the node's history parted from what the
head holds and nothing new is merged (FORK); when it does, new records go in."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from spark_slurm.head.merge import MergeSummary, merge_ledgers, positions
from spark_slurm.head.witness import witness_file
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.checkpoint import origin_for, parse_checkpoint, sign_checkpoint
from spark_slurm.ledger.keys import load_hmac_key, load_signing_key
from tests.unit.head import tamper
from tests.unit.head.builders import write_job
from tests.unit.head.conftest import Cluster

pytestmark = pytest.mark.both_stores


def merge(c: Cluster, state: Path | None = None) -> MergeSummary:
    return merge_ledgers(c.db, [str(c.n1)], keys_dir=c.trust, witness_state=state,
                         clock=c.clock)


def more(c: Cluster, job: str) -> None:
    keys = c.root / "keys-n1"
    with Ledger.open(c.n1, load_hmac_key(keys / "hmac.key"), load_signing_key(keys / "node.key"),
                     node="n1", clock=c.clock) as led:
        write_job(led, c.clock, "n1", job, [0], {0: 42})


def node_checkpoint(c: Cluster, size: int, *, keep: bool) -> str:
    """The node's checkpoint note of `size`; unless `keep`, every checkpoint gone from
    the node's file (so merge stores none and only the witness's copy speaks for it)."""
    with closing(sqlite3.connect(c.n1)) as conn:
        (text,) = conn.execute("SELECT text FROM checkpoint WHERE size = ?", (size,)).fetchone()
    if not keep:
        tamper.sql(c.n1, "DELETE FROM checkpoint")
    return str(text)


def witness(c: Cluster, text: str) -> Path:
    state = c.root / "witness"
    (state / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(c.trust / "n1.pub", state / "keys" / "n1.pub")
    (c.root / "n1.cp").write_text(text)
    witness_file(state, c.root / "n1.cp")
    return state


def other_history(c: Cluster, size: int) -> str:
    """A checkpoint the node's key signed over a history the head node does not hold."""
    key = load_signing_key(c.root / "keys-n1" / "node.key")
    return sign_checkpoint(origin_for("spark", "n1"), size, hashlib.sha256(b"other").digest(),
                           "00" * 32, key).text


def head(c: Cluster) -> int | None:
    return positions(c.db, ["n1"])[0].head_seq


@pytest.mark.parametrize(("at", "keep"), [("head", False), ("below", False), ("below", True)])
def test_a_witnessed_checkpoint_the_held_chain_has_lets_new_records_in(
        cluster: Cluster, at: str, keep: bool) -> None:
    """At the held head (the stored compact range answers), or below it (the stored
    tree answers, or the node's own matching checkpoint merged earlier)."""
    size = len(tamper.rows(cluster.n1))
    if at == "below":
        more(cluster, "300")
    text = node_checkpoint(cluster, size, keep=keep)
    assert merge(cluster).ok
    state = witness(cluster, text)
    held = head(cluster)
    assert held is not None and (held + 1 == size) == (at == "head")
    more(cluster, "301")
    summary = merge(cluster, state)
    assert summary.ok and summary.appended == len(tamper.rows(cluster.n1)) - held - 1


@pytest.mark.parametrize("at", ["head", "below"])
def test_a_witnessed_checkpoint_of_another_history_is_a_fork(cluster: Cluster,
                                                             at: str) -> None:
    """Below the head, the node's own (different) checkpoint of that size is held too."""
    size = len(tamper.rows(cluster.n1))
    if at == "below":
        more(cluster, "300")
    assert merge(cluster).ok
    held = head(cluster)
    state = witness(cluster, other_history(cluster, size))
    more(cluster, "301")
    summary = merge(cluster, state)
    assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
        ("FORK", "n1", None, f"first {size} records held differ from the witnessed checkpoint")]
    assert summary.appended == 0 and head(cluster) == held


def test_a_size_above_one_is_checked_against_the_held_chain(cluster: Cluster) -> None:
    """Even a checkpoint of the genesis alone (size 1) must be the held one."""
    assert merge(cluster).ok
    held = head(cluster)
    state = witness(cluster, other_history(cluster, 1))
    more(cluster, "300")
    summary = merge(cluster, state)
    assert [(f.code, f.seq) for f in summary.findings] == [("FORK", None)]
    assert summary.appended == 0 and head(cluster) == held


def pruned(c: Cluster) -> tuple[str, str, Path]:
    """n1 grown past 600 records (checkpoints at 300 and past the cut, none left in the
    file for merge to store; a copy kept at 500), merged, then pruned at 600: the
    leaves below the cut's 256-leaf block (512) are gone."""
    from spark_slurm.head.retention import prune  # noqa: PLC0415

    keys = c.root / "keys-n1"
    old = c.root / "n1-500.db"

    def ledger() -> Ledger:
        return Ledger.open(c.n1, load_hmac_key(keys / "hmac.key"),
                           load_signing_key(keys / "node.key"), node="n1", clock=c.clock)

    def fill(led: Ledger, size: int) -> None:
        led.append_many([("cap", {"v": 1, "node": "n1", "job_id": str(i)})
                         for i in range(led.size, size)])

    with ledger() as led:
        fill(led, 300)
        at_300 = led.checkpoint().text
        fill(led, 500)
    shutil.copy(c.n1, old)
    with ledger() as led:
        fill(led, 600)
        c.clock.advance(20 * 86400)  # into the next month: PostgreSQL cuts by month
        cut = int(dt.datetime(2023, 12, 1, tzinfo=dt.UTC).timestamp()) * 10**9
        assert c.clock.now_ns() > cut > tamper.rows(c.n1)[-1][1]
        fill(led, 601)  # and the seals of every hour since
        fill(led, led.size + 50)
        later = led.checkpoint().text
        fill(led, led.size + 50)
    tamper.sql(c.n1, "DELETE FROM checkpoint")
    tamper.sql(old, "DELETE FROM checkpoint")
    assert merge(c).ok
    (cut_at,) = prune(c.db, cut).nodes
    assert cut_at.first_seq == 600
    return at_300, later, old


def test_a_witnessed_checkpoint_of_pruned_records_is_not_checked_again(
        cluster: Cluster) -> None:
    """It was checked when those records were merged; their leaves are gone now."""
    at_300, _, _ = pruned(cluster)
    state = witness(cluster, at_300)
    held = head(cluster)
    assert held is not None
    more(cluster, "300")
    summary = merge(cluster, state)
    assert summary.ok and summary.appended == len(tamper.rows(cluster.n1)) - held - 1


def test_a_copy_older_than_the_prune_cut_is_still_held_to_the_witness(
        cluster: Cluster) -> None:
    _, later, old = pruned(cluster)
    state = witness(cluster, later)
    held = head(cluster)
    summary = merge_ledgers(cluster.db, [str(old)], keys_dir=cluster.trust,
                            witness_state=state, clock=cluster.clock)
    assert [(f.code, f.seq, f.detail) for f in summary.findings] == [
        ("ROLLBACK", 500, f"ledger ends at seq 499 but the head node already holds up to "
         f"seq {held}"),
        ("ROLLBACK", 500, "ledger holds 500 records but a witnessed checkpoint has "
         f"{parse_checkpoint(later).size}")]
    assert summary.appended == 0 and head(cluster) == held


@pytest.mark.parametrize("keep", [False, True])
def test_a_head_node_that_lost_held_records_cannot_vouch_for_a_witnessed_root(
        cluster: Cluster, keep: bool) -> None:
    """A stored record deleted from the cluster store: the held chain's root at the
    witnessed size cannot be computed, so it is not taken as matching (FORK), unless
    the node's own checkpoint of that size, verified when it was merged, has it."""
    from tests.unit.head.stores import execute  # noqa: PLC0415

    size = len(tamper.rows(cluster.n1))
    more(cluster, "300")
    text = node_checkpoint(cluster, size, keep=keep)
    assert merge(cluster).ok
    execute(cluster.db, "DELETE FROM records WHERE seq = 5")
    state = witness(cluster, text)
    more(cluster, "301")
    summary = merge(cluster, state)
    if keep:
        assert summary.ok and summary.appended > 0
    else:
        assert [(f.code, f.seq) for f in summary.findings] == [("FORK", None)]
        assert summary.appended == 0


@pytest.mark.parametrize("at", ["head", "below"])
def test_with_nothing_new_a_witnessed_checkpoint_of_another_history_is_still_a_fork(
        cluster: Cluster, at: str) -> None:
    """The nightly no-op path (the source ends at the held head) still holds the node to
    the witness; below the head the node's own checkpoint of that size is held."""
    size = len(tamper.rows(cluster.n1))
    if at == "below":
        more(cluster, "300")
        with Ledger.open(cluster.n1, None, load_signing_key(cluster.root / "keys-n1" / "node.key"),
                         node="n1", clock=cluster.clock) as led:
            led.checkpoint()
    assert merge(cluster).ok
    held = head(cluster)
    summary = merge(cluster, witness(cluster, other_history(cluster, size)))
    assert [(f.code, f.seq) for f in summary.findings] == [("FORK", None)]
    assert summary.appended == 0 and head(cluster) == held


@pytest.mark.parametrize("at", ["head", "below"])
def test_with_nothing_new_the_held_chain_agrees_with_its_witness(cluster: Cluster,
                                                                 at: str) -> None:
    size = len(tamper.rows(cluster.n1))
    if at == "below":
        more(cluster, "300")
    text = node_checkpoint(cluster, size, keep=True)
    assert merge(cluster).ok
    summary = merge(cluster, witness(cluster, text))
    assert summary.ok and summary.appended == 0 and summary.results[0].read == 0


def test_with_nothing_new_a_copy_shorter_than_its_witness_is_a_rollback(
        cluster: Cluster) -> None:
    """The witness saw records the head node has not: the file offered is an old one."""
    old = cluster.root / "n1-old.db"
    shutil.copy(cluster.n1, old)
    size = len(tamper.rows(cluster.n1))
    more(cluster, "300")
    with Ledger.open(cluster.n1, None, load_signing_key(cluster.root / "keys-n1" / "node.key"),
                     node="n1", clock=cluster.clock) as led:
        text = led.checkpoint().text
    assert merge_ledgers(cluster.db, [str(old)], keys_dir=cluster.trust).ok
    summary = merge_ledgers(cluster.db, [str(old)], keys_dir=cluster.trust,
                            witness_state=witness(cluster, text))
    big = parse_checkpoint(text).size
    assert [(f.code, f.seq, f.detail) for f in summary.findings] == [
        ("ROLLBACK", size, f"ledger holds {size} records but a witnessed checkpoint has {big}")]


@pytest.mark.parametrize("history", ["same", "other"])
def test_a_witnessed_checkpoint_at_the_end_of_the_new_records_is_compared(
        cluster: Cluster, history: str) -> None:
    """Nothing held yet; the witness cosigned a checkpoint of the ledger's whole size
    (the node's own checkpoints gone): the new records must have its root."""
    size = len(tamper.rows(cluster.n1))
    text = node_checkpoint(cluster, size, keep=False)
    state = witness(cluster, text if history == "same" else other_history(cluster, size))
    summary = merge(cluster, state)
    if history == "same":
        assert summary.ok and summary.appended == size and head(cluster) == size - 1
    else:
        assert [(f.code, f.node, f.seq, f.detail) for f in summary.findings] == [
            ("FORK", "n1", None, f"first {size} records differ from the witnessed checkpoint")]
        assert summary.appended == 0 and head(cluster) is None
