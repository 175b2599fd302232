"""Retention: old records leave the cluster store, and everything kept still verifies.

Two nodes run one job a month for four months. Pruning everything before the third
month must keep each node's genesis and head, leave every later job's audit clean
(the first kept record's link checks against the stored anchor, proofs across the
cut use the kept leaves), let the next merge continue, and, with an archive, let
the pruned jobs be audited from the archive with the same proofs.
"""

from __future__ import annotations

import datetime as dt
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.clock import ManualClock
from spark_slurm.errors import UnknownJob
from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.retention import prune
from spark_slurm.head.store import PruneNote, open_store
from spark_slurm.ledger import Ledger
from tests.unit.head import tamper
from tests.unit.head.builders import POLICY, NodeKeys, make_keys, write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import execute, query

pytestmark = pytest.mark.both_stores
START = int(dt.datetime(2025, 1, 10, tzinfo=dt.UTC).timestamp()) * 10**9
MONTH_S = 31 * 86400


@dataclass
class Months:
    db: str
    trust: Path
    ledgers: dict[str, Path]
    keys: dict[str, NodeKeys]
    clock: ManualClock


def _jobs(led: Ledger, clock: ManualClock, node: str, first: int, count: int) -> None:
    for j in range(first, first + count):
        write_job(led, clock, node, f"m{j}", [0], {0: 1000 * (j + 1)})
        led.checkpoint()
        clock.advance(MONTH_S)


@pytest.fixture
def months(cluster: Cluster) -> Months:
    clock = ManualClock(START)
    ledgers, keys = {}, {}
    for node in ("r1", "r2"):
        k = make_keys(cluster.root, node, cluster.trust)
        (cluster.trust / f"{node}.hmac").unlink()  # no HMAC: no seal every idle hour
        path = cluster.root / f"{node}.db"
        with Ledger.open(path, None, k.signing, node=node, cluster="spark", clock=clock) as led:
            led.append("policy", dict(POLICY.snapshot_body(), node=node))
            _jobs(led, clock, node, 0, 4)
        clock = ManualClock(START + 3600 * 10**9)  # r2 runs an hour behind r1
        ledgers[node], keys[node] = path, k
    assert merge_ledgers(cluster.db, [str(p) for p in ledgers.values()],
                         keys_dir=cluster.trust).ok
    return Months(cluster.db, cluster.trust, ledgers, keys, clock)


def _cut() -> int:
    return int(dt.datetime(2025, 3, 1, tzinfo=dt.UTC).timestamp()) * 10**9


def _seqs(db: str, node: str) -> list[int]:
    with closing(open_store(db)) as store:
        return [r[0] for r in query(store, "SELECT r.seq FROM records r JOIN nodes n USING"
                                    " (node_id) WHERE n.name = ? ORDER BY r.seq", (node,))]


def test_prune_keeps_genesis_head_and_every_later_record(months: Months) -> None:
    before = {n: _seqs(months.db, n) for n in months.ledgers}
    report = prune(months.db, _cut())
    assert report.removed > 0 and {c.node for c in report.nodes} == {"r1", "r2"}
    for cut in report.nodes:
        kept = _seqs(months.db, cut.node)
        assert kept[0] == 0 and kept[1] == cut.first_seq  # the genesis, then the cut
        assert kept[1:] == [s for s in before[cut.node] if s >= cut.first_seq]
        assert cut.removed == len(before[cut.node]) - len(kept)
        rows = {r[0]: r for r in tamper.rows(months.ledgers[cut.node])}
        assert rows[cut.first_seq][1] >= _cut() > rows[cut.first_seq - 1][1]
    if months.db.startswith("postgres"):
        assert sorted(report.partitions) == ["records_p202501", "records_p202502"]


def test_what_is_kept_still_verifies_and_merges_on(months: Months) -> None:
    report = prune(months.db, _cut())
    first = {c.node: c.first_seq for c in report.nodes}
    for job in ("m2", "m3"):
        audit = audit_job(months.db, job, keys_dir=months.trust)
        assert audit.ok, audit.problems
        assert {e.verification.proof for e in audit.timeline} == {"ok"}
        assert all(e.verification.chain == "ok" for e in audit.timeline)
    with pytest.raises(UnknownJob, match="no records") as gone:
        audit_job(months.db, "m0")
    assert "records before 2025-03-01T00:00:00Z were pruned from this store without an " \
        "archive" in gone.value.message
    # the first kept record links to the anchor: change it and that link fails
    zero = "decode(repeat('00', 32), 'hex')" if months.db.startswith("postgres") \
        else "zeroblob(32)"
    execute(months.db, f"UPDATE nodes SET anchor = {zero} WHERE name = 'r1'")
    broken = audit_job(months.db, "m2")
    bad = [(e.node, e.seq, e.verification.chain) for e in broken.timeline
           if not e.verification.ok]
    assert bad == [("r1", first["r1"], f"does not link to seq {first['r1'] - 1}")]
    execute(months.db, "UPDATE nodes SET anchor = ? WHERE name = 'r1'",
            (bytes.fromhex(tamper.rows(months.ledgers["r1"])[first["r1"] - 1][6].hex()),))
    clock = ManualClock(START + 5 * MONTH_S * 10**9)
    k = months.keys["r1"]
    with Ledger.open(months.ledgers["r1"], None, k.signing, node="r1",
                     cluster="spark", clock=clock) as led:
        _jobs(led, clock, "r1", 4, 1)
    merged = merge_ledgers(months.db, [str(p) for p in months.ledgers.values()],
                           keys_dir=months.trust)
    assert merged.ok and merged.appended > 0
    assert audit_job(months.db, "m4", keys_dir=months.trust).ok
    again = prune(months.db, _cut())  # nothing more is that old
    assert again.removed == 0 and {c.node: c.first_seq for c in report.nodes} == first


def test_pruned_jobs_are_audited_from_the_archive(months: Months, tmp_path: Path) -> None:
    archive = tmp_path / "archive-2025q1.db"
    first = prune(months.db, int(dt.datetime(2025, 2, 1, tzinfo=dt.UTC).timestamp()) * 10**9,
                  archive)
    assert first.removed > 0 and sum(c.archived for c in first.nodes) > 0
    audit = audit_job(archive, "m0", keys_dir=months.trust)
    assert audit.ok and {e.verification.proof for e in audit.timeline} == {"ok"}
    second = prune(months.db, _cut(), archive)  # extends the same archive
    assert second.removed > 0
    for job in ("m0", "m1"):
        report = audit_job(archive, job, keys_dir=months.trust)
        assert report.ok, report.problems
        assert {e.node for e in report.timeline} == {"r1", "r2"}
    assert audit_job(months.db, "m3", keys_dir=months.trust).ok
    # the store names where a pruned job went; a job that never was is only unknown
    with pytest.raises(UnknownJob) as gone:
        audit_job(months.db, "m1")
    assert gone.value.message.endswith(
        f"(records before 2025-03-01T00:00:00Z were pruned from this store; archived in "
        f"{archive}: sparkctl audit JOBID --db ARCHIVE)")
    assert [n.archive for n in _prunes(months.db)] == [str(archive), str(archive)]
    with pytest.raises(UnknownJob) as never:
        audit_job(archive, "m9")
    assert never.value.message == f"job m9: no records in {archive}"


def _prunes(db: str) -> list[PruneNote]:
    with closing(open_store(db)) as store:
        return store.prunes()


def test_a_store_never_pruned_says_only_no_records(months: Months) -> None:
    with pytest.raises(UnknownJob) as err:
        audit_job(months.db, "m9")
    assert err.value.message == f"job m9: no records in {months.db}"
    assert prune(months.db, START).removed == 0  # nothing that old: no prune to remember
    assert _prunes(months.db) == []


def test_the_head_is_kept_even_when_every_record_is_old(months: Months) -> None:
    far = int(dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()) * 10**9
    report = prune(months.db, far)
    for cut in report.nodes:
        kept = _seqs(months.db, cut.node)
        assert kept == [0, len(tamper.rows(months.ledgers[cut.node])) - 1]


def test_prune_from_the_cli(months: Months, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["prune", "--db", months.db, "--before", "2025-03-01T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "r1" in out and "pruned" in out
    assert run(["prune", "--db", months.db, "--before", "yesterday-ish"]) == 2
