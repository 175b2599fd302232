"""Node ledgers written by real `sparkd` processes (sim GPUs), snapshotted, merged, audited."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.tariff import flat
from spark_slurm.ledger.keys import keygen
from tests.integration.daemon.conftest import OWNER_UID, Sparkd

SPARKCTL = Path(sys.executable).with_name("sparkctl")
JOB = "700"


class NodeDaemon(Sparkd):
    """The daemon test harness, renamed to another node and given its keys."""

    def __init__(self, root: Path, node: str, trust: Path) -> None:
        super().__init__(root, thermal_c=(95, 90))  # no thermal guard: a plain job
        self.node = node
        files = keygen(root / "keys")
        shutil.copy(files.public_key, trust / f"{node}.pub")
        shutil.copy(files.hmac_key, trust / f"{node}.hmac")
        (trust / f"{node}.hmac").chmod(0o600)
        text = self.config.read_text().replace("node: n1\n", f"node: {node}\n")
        self.config.write_text(text + f"keys: {{hmac: {files.hmac_key}, "
                                      f"signing: {files.signing_key}}}\n")
        self.jobs[JOB] = {"user": "u4242", "uid": OWNER_UID, "account": "physics",
                          "partition": "gpu", "node_gpus": {node: [0, 1]}, "state": "RUNNING"}
        self.write_jobs()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeDaemon]]:
    trust = tmp_path / "trust"
    trust.mkdir()
    daemons = []
    for node in ("n1", "n2"):
        root = tmp_path / node
        root.mkdir()
        daemons.append(NodeDaemon(root, node, trust))
    try:
        yield daemons
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()


def follow_up_of(seq: int) -> Callable[[dict[str, Any]], bool]:
    def match(r: dict[str, Any]) -> bool:
        return bool(r["kind"] == "facility" and r["body"].get("ref", {}).get("seq") == seq)
    return match


def counters(d: NodeDaemon) -> dict[int, int]:
    return {g: d.fleet.sample(g).energy_mj for g in (0, 1)}


@pytest.mark.slow
def test_two_node_job_through_real_daemons_merges_and_audits(nodes: list[NodeDaemon],
                                                             tmp_path: Path) -> None:
    before, after = {}, {}
    for d in nodes:
        # read before sparkd starts: its start-of-job reading (the sampler's latest, or a
        # direct read) is then never older than ours, so ours brackets the job's energy
        before[d.node] = counters(d)
        d.start()
        d.fleet.set_load(0.9)
        reply = d.prolog(JOB, watts=1000, gpus=[0, 1])
        assert reply["ok"], reply
    time.sleep(2.5)  # the job runs; the facility follow-ups fall due
    for d in nodes:
        reply = d.request({"op": "epilog", "job_id": JOB, "user": "u4242", "uid": OWNER_UID,
                           "partition": "gpu"})
        assert reply["ok"], reply
        after[d.node] = counters(d)
    for d in nodes:  # each action's facility follow-up is written once its window has passed
        for kind in ("cap", "restore"):
            (action,) = [r for r in d.records(kind) if r["body"].get("job_id") == JOB]
            d.wait_record(follow_up_of(action["seq"]), 60,
                          f"{d.node} facility follow-up of {kind}")
    snapshots = []
    for d in nodes:
        assert d.stop() == 0  # shutdown checkpoint
        snap = tmp_path / f"{d.node}-snap.db"
        subprocess.run([str(SPARKCTL), "ledger", "snapshot", str(d.state_dir / "ledger.db"),
                        str(snap)], check=True, capture_output=True, timeout=60)
        snapshots.append(f"{d.node}={snap}")

    db = tmp_path / "cluster.db"
    summary = merge_ledgers(db, snapshots, keys_dir=tmp_path / "trust")
    assert summary.ok, summary.to_json()
    again = merge_ledgers(db, snapshots, keys_dir=tmp_path / "trust")
    assert again.ok and again.appended == 0

    report = audit_job(db, JOB, flat("0.30"), plot=tmp_path / "job.png")
    assert {e.node for e in report.timeline} == {"n1", "n2"}
    assert [e.time_ns for e in report.timeline] == sorted(e.time_ns for e in report.timeline)
    assert all(e.verification.chain == "ok" and e.verification.proof == "ok"
               for e in report.timeline), [e.verification for e in report.timeline]
    kinds = {e.kind for e in report.timeline}
    assert {"cap", "restore", "facility"} <= kinds
    assert report.ok, report.problems  # every record verified, every action validated
    # energy: the sum of the sim GPUs' counters over the job, as the daemon read them
    recorded = {(e.node, e.gpu): e.energy_mj for e in report.energy}
    assert len(recorded) == 4 and report.energy_mj == sum(recorded.values())
    for (node, gpu), mj in recorded.items():
        # within the bracket, and most of it: the job ran near its 500 W cap for most of it
        assert 0.5 * (after[node][gpu] - before[node][gpu]) <= mj \
            <= after[node][gpu] - before[node][gpu]
    assert report.cost is not None and report.cost.total > 0
    assert (tmp_path / "job.png").stat().st_size > 10_000

    out = subprocess.run([str(SPARKCTL), "audit", JOB, "--db", str(db), "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    doc = json.loads(out.stdout)
    assert doc["energy"]["total_mj"] == report.energy_mj
    assert out.returncode == (0 if doc["verdict"]["ok"] else 1)

    # a tampered node snapshot is named at merge; the other node still merges
    bad = tmp_path / "n1-snap.db"
    conn = sqlite3.connect(bad)
    with conn:
        conn.execute("UPDATE per SET body = CAST(replace(body, 'physics', 'chemist') AS BLOB) "
                     "WHERE kind = 'cap'")
    conn.close()
    fresh = merge_ledgers(tmp_path / "fresh.db", snapshots, keys_dir=tmp_path / "trust")
    codes = [(f.code, f.node) for f in fresh.findings]
    assert ("TAMPERED", "n1") in codes
    assert next(r for r in fresh.results if r.node == "n2").ok
