"""Audits read the cluster store while a merge writes to it, on either backend.

A merge holds one transaction per node for as long as that node's rows stream in;
an audit (or a positions query) running meanwhile must neither wait for it nor see
its uncommitted rows.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import closing
from hashlib import sha256
from typing import Any

import pytest

from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers, positions
from spark_slurm.head.store import open_store
from tests.unit.head.conftest import Cluster

pytestmark = pytest.mark.both_stores
WAIT_S = 60


class Holding:
    """A check that lets three rows in, then holds the transaction open until told."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self.timed_out = False
        self.seen = 0

    def __call__(self, rec: Sequence[Any]) -> bytes | None:
        self.seen += 1
        if self.seen > 3:
            return None
        if self.seen == 3:
            self.holding.set()
            self.timed_out = not self.release.wait(WAIT_S)
        return sha256(b"\x00" + rec[4]).digest()

    def stop(self, code: str, seq: int, why: str) -> None:
        self.seen = 99

    def restart(self) -> None:
        self.seen = 0


def test_audits_run_while_a_merge_holds_its_transaction(cluster: Cluster) -> None:
    assert merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust).ok
    check = Holding()
    stored: list[int] = []

    def merge_n2() -> None:
        with closing(open_store(cluster.db)) as store, store.writer(cluster.n2,
                                                                     node="n2") as w:
            state = w.lock_node("n2", "spark/spark/n2")
            stored.append(w.append(state, 0, check))

    writer = threading.Thread(target=merge_n2)
    writer.start()
    try:
        assert check.holding.wait(WAIT_S)
        report = audit_job(cluster.db, "100")  # while n2's rows are uncommitted
        assert report.ok and {e.node for e in report.timeline} == {"n1"}
        (n2,) = positions(cluster.db, ["n2"])
        assert n2.count == 0
    finally:
        check.release.set()
        writer.join(WAIT_S)
    assert not check.timed_out, "the audit waited for the merge's transaction"
    assert stored == [3]
    with closing(open_store(cluster.db)) as store:
        rows = store.stored_hashes(store.node("n2").node_id, 0, 10)  # type: ignore[union-attr]
    assert sorted(rows) == [0, 1, 2]
