"""The ledger writer: coinciding submissions share one commit; receipts match the ledger."""

from __future__ import annotations

import threading
from pathlib import Path

from spark_slurm.daemon.writer import LedgerWriter
from spark_slurm.errors import CanonicalError
from spark_slurm.ledger import Ledger, verify_ledger


def test_concurrent_submissions_are_batched_and_each_gets_its_receipt(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    seen: list[int] = []
    writer = LedgerWriter(ledger, on_commit=lambda kind, body, r: seen.append(r.seq))
    writer.start()
    receipts: dict[int, object] = {}

    def submit(i: int) -> None:
        receipts[i] = writer.commit("cap", {"v": 1, "job_id": str(i), "n": i})

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.stop()
    assert writer.committed == 64
    assert writer.batches < 64  # at least some requests shared a commit
    by_seq = {r.seq: r for r in ledger.records(kinds=["cap"])}
    for i, receipt in receipts.items():
        record = by_seq[receipt.seq]  # type: ignore[attr-defined]
        assert record.body["n"] == i and record.hash == receipt.hash  # type: ignore[attr-defined]
    assert sorted(seen) == sorted(by_seq)
    ledger.close()
    assert verify_ledger(tmp_path / "l.db").ok


def test_a_bad_body_fails_alone(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db", node="n1")
    writer = LedgerWriter(ledger)
    futures = [writer.submit("cap", {"v": 1}), writer.submit("cap", {"v": 1.5}),
               writer.submit("cap", {"v": 2})]
    writer.start()
    assert futures[0].result(10).seq >= 1
    assert isinstance(futures[1].exception(10), CanonicalError)
    assert futures[2].result(10).seq == futures[0].result().seq + 1
    writer.stop()
    assert writer.submit("cap", {"v": 3}).exception(1) is not None  # stopped: refused
    ledger.close()
