"""A record rewritten together with everything derived from it, against every checker.

The attacker (`tamper.rewrite_derived`) edits record K's body and recomputes its
hash, the saved Merkle frontier and the stored subtrees, with the HMAC key also
the MACs, and (relinked) every later record's prev hash and hash; it re-signs no
checkpoint. Left with record K+1 untouched, the link rule catches it at K+1 in
`sparkctl verify` (sequential and parallel walk) and in merge (fast and full
checks), all through `chain.continues`. Relinked, the chain is self-consistent:
what catches it is what was fixed before the rewrite, the node's signed
checkpoints, the head node's held chain and the witness's cosigned checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import WitnessError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import MergeSummary, merge_into, merge_ledgers
from spark_slurm.head.node_merge import SAME_SEQ
from spark_slurm.head.store import open_store
from spark_slurm.head.witness import witness_checkpoint
from spark_slurm.ledger import Checkpoint, Ledger, verify_ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key
from spark_slurm.ledger.schema import open_existing
from spark_slurm.ledger.segment import export_segment
from spark_slurm.ledger.verify_par import walk_parallel
from spark_slurm.ledger.verify_walk import Bad, Walk, walk
from tests.unit.head import tamper
from tests.unit.head.stores import node_rows

pytestmark = pytest.mark.both_stores

N = 300  # more than 2^8 records: the stored subtrees are part of what is rewritten
K = 2
HELD = 150  # records the head node merged before the rewrite
LINK = f"prev hash does not match the hash of seq {K}"


@dataclass
class Node:
    path: Path
    trust: Path
    k0: bytes | None
    witnessed: Checkpoint  # size 100, cosigned before the rewrite
    latest: Checkpoint  # size N, signed by the node before the rewrite
    stores: Any  # name -> a fresh store URL of this test's kind


@pytest.fixture(params=[False, True], ids=["unkeyed", "hmac"])
def node(request: pytest.FixtureRequest, tmp_path: Path, store_kind: str) -> Iterator[Node]:
    files = keygen(tmp_path / "keys")
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(files.public_key, trust / "n1.pub")
    k0 = load_hmac_key(files.hmac_key) if request.param else None
    if k0 is not None:
        shutil.copy(files.hmac_key, trust / "n1.hmac")
        (trust / "n1.hmac").chmod(0o600)
    clock = ManualClock()
    path = tmp_path / "n1.db"
    witnessed = None
    with Ledger.open(path, k0, load_signing_key(files.signing_key), node="n1", cluster="c1",
                     clock=clock, epoch_seconds=60) as led:
        for i in range(1, N):
            led.append("cap", {"v": 1, "node": "n1", "job_id": str(i % 5),
                               "power_mw": 1000 + i})
            clock.advance(1)
            led.maintain()  # seals each finished HMAC epoch: MACs under several keys
            if led.size == 100:
                witnessed = led.checkpoint()
        latest = led.checkpoint()
    assert witnessed is not None and latest.size == led.size
    if store_kind == "postgresql":
        server = request.getfixturevalue("pg_server")
        stores = lambda _name: str(server.database())  # noqa: E731
    else:
        stores = lambda name: str(tmp_path / f"{name}.db")  # noqa: E731
    yield Node(path, trust, k0, witnessed, latest, stores)


def _merge(n: Node, into: str, source: Path | str, *, fast: bool = True,
           witness: Path | None = None) -> MergeSummary:
    if witness is not None:
        return merge_ledgers(into, [str(source)], keys_dir=n.trust, witness_state=witness)
    with closing(open_store(into, create=True)) as store, closing(open_store(into)) as reads:
        return merge_into(store, reads, [str(source)], KeyRing.load(n.trust), fast=fast)


def _walks(n: Node, need: set[int]) -> tuple[Walk | Bad, Walk | Bad]:
    """The sequential walk and the parallel one (chunks of 2^5 on two workers)."""
    out: list[Walk | Bad] = []
    for parallel in (False, True):
        conn, meta = open_existing(n.path)
        w = Walk(meta, n.k0, set(need))
        try:
            conn.execute("BEGIN")
            if parallel:
                assert walk_parallel(conn, n.path, w, n.k0, procs=2, chunk_bits=5)
            else:
                walk(conn, w)
            out.append(w)
        except Bad as bad:
            out.append(bad)
        finally:
            conn.close()
    return out[0], out[1]


def _witness(n: Node, tmp_path: Path) -> Path:
    """The witness state as it stood before the rewrite: checkpoint 100 cosigned."""
    state = tmp_path / "witness"
    witness_checkpoint(state, n.witnessed.text, KeyRing.load(n.trust))
    return state


def test_a_rewrite_left_unlinked_fails_at_the_next_record_everywhere(
        node: Node, tmp_path: Path) -> None:
    state = _witness(node, tmp_path)
    assert verify_ledger(node.path, node.k0).ok
    tamper.rewrite_derived(node.path, K, relink=False, k0=node.k0)

    report = verify_ledger(node.path, node.k0)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, K + 1, LINK)
    for w in _walks(node, {100, N}):
        assert isinstance(w, Bad) and (w.seq, w.reason) == (K + 1, LINK)

    for fast in (True, False):  # the inline test and the full checks
        summary = _merge(node, node.stores(f"fresh-{fast}"), node.path, fast=fast)
        assert [(f.code, f.seq, f.detail) for f in summary.findings] == [
            ("TAMPERED", K + 1, f"does not link to seq {K}")]

    with pytest.raises(WitnessError, match=r"FORK: .* not consistent with the witnessed size 100"):
        witness_checkpoint(state, node.latest.text, KeyRing.load(node.trust), ledger=node.path)


def test_a_relinked_rewrite_is_caught_by_what_was_fixed_before_it(
        node: Node, tmp_path: Path) -> None:
    state = _witness(node, tmp_path)
    held = node.stores("held")
    prefix = export_segment(node.path, tmp_path / "prefix.seg", -1, HELD - 1).path
    assert _merge(node, held, prefix).ok
    before = node_rows(held, "n1")
    tamper.rewrite_derived(node.path, K, relink=True, k0=node.k0)

    # self-consistent: both walks accept every record and agree on every root, and
    # the root at 100 is not the one the node signed; verify names its last record
    seq, par = _walks(node, {100, N})
    assert isinstance(seq, Walk) and isinstance(par, Walk)
    assert seq.roots == par.roots and seq.chain.to_bytes() == par.chain.to_bytes()
    assert seq.roots[100][0] != node.witnessed.root
    report = verify_ledger(node.path, node.k0)
    assert (report.ok, report.first_bad_seq) == (False, 99)
    assert "differs from stored checkpoint" in report.reason

    # the head node's held chain: the histories part at the rewritten seq
    summary = _merge(node, held, node.path)
    assert [(f.code, f.seq, f.detail) for f in summary.findings][:1] == [
        ("FORK", K, SAME_SEQ)]
    assert summary.appended == 0 and node_rows(held, "n1") == before

    # a store that holds nothing yet: the node's own signed checkpoints
    summary = _merge(node, node.stores("fresh"), node.path)
    assert [(f.code, f.detail) for f in summary.findings] == [
        ("FORK", "records differ from the ledger's own signed checkpoint of size 100")]
    assert summary.appended == 0

    # the node's checkpoints deleted as well: the witness's cosigned one
    tamper.sql(node.path, "DELETE FROM checkpoint")
    summary = _merge(node, node.stores("witnessed"), node.path, witness=state)
    assert ("FORK", None, "first 100 records differ from the witnessed checkpoint") in [
        (f.code, f.seq, f.detail) for f in summary.findings]
    assert summary.appended == 0

    # and the witness itself, handed the node's last signed checkpoint and the ledger
    with pytest.raises(WitnessError, match=r"FORK: .* not consistent with the witnessed size 100"):
        witness_checkpoint(state, node.latest.text, KeyRing.load(node.trust), ledger=node.path)
