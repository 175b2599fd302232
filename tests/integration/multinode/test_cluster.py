"""A real multi-node cluster end to end: one job on three slurmd, per-node caps and
budgets, the controller's denials, collection over ssh, witness, merge and audit."""

from __future__ import annotations

import sqlite3
import subprocess
import time

import pytest

from spark_slurm.demo.services import wait_for
from spark_slurm.demo.stack import ClusterStack
from spark_slurm.head.audit import audit_job
from spark_slurm.ledger.records import Record
from tests.integration.multinode.conftest import BUDGET_W, Head

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_each_host_is_its_own_machine(cluster: ClusterStack) -> None:
    assert cluster.topology is not None
    seen = {}
    for host in cluster.hosts:
        out = subprocess.run(cluster.cluster.in_ns(host.name, [
            "sh", "-c", "hostname; ls /run/spark/sparkd.sock /run/spark/state/ledger.db"]),
            capture_output=True, text=True, timeout=30, check=True).stdout.split()
        seen[host.name] = out[0]
        assert host.status()["node"] == host.name
    assert seen == {h.name: h.name for h in cluster.hosts}
    assert len({h.address for h in cluster.hosts}) == 4
    assert len({str(h.ledger) for h in cluster.hosts}) == 4
    assert len({h.public_key.read_text() for h in cluster.hosts}) == 4
    assert cluster.controller.status()["gpus"] == []
    assert all(len(n.status()["gpus"]) == 8 for n in cluster.nodes)


def test_a_job_on_three_nodes_is_capped_by_each_nodes_sparkd(cluster: ClusterStack,
                                                             head: Head) -> None:
    job = cluster.cluster.submit(["-J", "mn-cap", "-N3", "--gres=gpu:2,gpupower:1000"],
                                 wrap="srun hostname; sleep 3")
    cluster.wait_running(job)
    for node in cluster.nodes:
        [cap] = node.wait_records(job, "cap")
        assert cap.body["node"] == node.name
        assert cap.body["decision"]["granted_mw"] == 500_000
        node.wait_limits({g["index"]: 500 for g in cap.body["gpus"]})
    assert cluster.cluster.wait_job(job) == "COMPLETED"
    out = (cluster.cluster.out_dir / f"{job}.out").read_text().split()
    assert sorted(out) == ["n1", "n2", "n3"]            # srun ran on the three hosts
    for node in cluster.nodes:
        node.wait_records(job, "restore")
        node.wait_limits({i: 1000 for i in range(8)})
    run = head.collect()
    assert run.returncode == 0, run.stderr
    report = audit_job(head.db, job, keys_dir=cluster.trust_dir)
    assert report.ok, report.problems
    assert sorted(report.header["nodes"]) == ["n1", "n2", "n3"]
    assert all(e.verification.ok and e.verification.mac == "ok" for e in report.timeline)
    for name in ("n1", "n2", "n3"):
        assert [e.kind for e in report.timeline if e.node == name and e.kind != "facility"] \
            == ["admission", "cap", "restore"]


def test_a_second_job_past_one_nodes_budget_waits_for_the_first(cluster: ClusterStack) -> None:
    first = cluster.cluster.submit(["-J", "mn-budget-a", "-N3", "--gres=gpu:2,gpupower:1400"],
                                   wrap="sleep 6")
    cluster.wait_running(first)
    refused = subprocess.run(["salloc", "--immediate", "-w", "n2",
                              "--gres=gpu:4,gpupower:2800", "true"], env=cluster.cluster.env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode != 0
    assert "Unable to allocate resources" in refused.stderr
    second = cluster.cluster.submit(["-J", "mn-budget-b", "-w", "n2",
                                     "--gres=gpu:4,gpupower:2800"], wrap="true")
    time.sleep(2)
    assert cluster.cluster.job_state(second) == "PENDING"         # 1400 + 2800 > 4000 W
    assert cluster.cluster.job_field(second, "Reason") == "Resources"
    assert BUDGET_W < 1400 + 2800
    assert cluster.cluster.wait_job(second, timeout=90) == "COMPLETED"
    n2 = cluster.node("n2")
    n2.wait_records(second, "restore")
    assert cluster.cluster.job_field(second, "StartTime") >= \
        cluster.cluster.job_field(first, "EndTime")


def test_submit_time_denials_are_the_controllers_pers_and_reach_the_head(
        cluster: ClusterStack, head: Head) -> None:
    before = {r.seq for r in cluster.controller.records()}
    for i in range(3):
        res = cluster.cluster.sbatch(["-J", f"mn-denied-{i}", "--account=students",
                                      "--gres=gpu:2,gpupower:800"], check=False)
        assert res.returncode != 0 and "tenant:students" in res.stderr
    new: list[Record] = []

    def recorded() -> bool:   # no ingest request: the controller's sparkd polls the spool
        new[:] = [r for r in cluster.controller.records() if r.seq not in before
                  and r.kind == "admission" and r.body.get("decision") == "deny"]
        return len(new) >= 3

    assert wait_for(recorded, 20, 0.2), [r.kind for r in cluster.controller.records()]
    assert [r.body["context"]["job_name"] for r in new] == [
        "mn-denied-0", "mn-denied-1", "mn-denied-2"]
    assert all(not n.find_records("admission", timeout=0, match={"decision": "deny"})
               for n in cluster.nodes)
    run = head.collect()
    assert run.returncode == 0, run.stderr
    assert run.node("ctl")["fetched"] and run.node("ctl")["witness"] == "accepted"
    conn = sqlite3.connect(head.db)
    try:
        merged = conn.execute(
            "SELECT count(*) FROM records r JOIN nodes n USING (node_id) "
            "WHERE n.name = 'ctl' AND r.kind = 'admission'").fetchone()[0]
    finally:
        conn.close()
    assert merged >= 3


def test_the_next_collection_ships_only_what_each_node_wrote_since(
        cluster: ClusterStack, head: Head) -> None:
    """Issue 16/17: over real ssh, a node the head already holds sends a segment of its
    records since the last merge, with the proof its newest checkpoint needs; what
    travels follows what is new, not the length of the ledger."""
    first = head.collect()
    assert first.returncode == 0, first.stderr
    assert {first.node(h.name)["kind"] for h in cluster.hosts} == {"ledger"}
    job = cluster.cluster.submit(["-J", "mn-segment", "-w", "n1", "--gres=gpu:2,gpupower:800"],
                                 wrap="sleep 1")
    assert cluster.cluster.wait_job(job, timeout=90) == "COMPLETED"
    cluster.node("n1").wait_records(job, "restore")
    again = head.collect()
    assert again.returncode == 0, again.stderr
    appended = {r["node"]: r["appended"] for r in again.report["merge"]["nodes"]}
    for host in cluster.hosts:
        was, now = first.node(host.name), again.node(host.name)
        assert now["kind"] == "segment" and now["head_seq"] is not None
        assert now["after"] == now["head_seq"] and now["rows"] == appended[host.name]
        assert now["proof_from"] is not None and now["witness"] in ("accepted", "unchanged")
        # the demo's ledgers are short: what travels shows in records, not bytes. The
        # segment starts where the first (whole) copy ended and holds what was merged
        assert now["after"] == was["rows"] - 1, (host.name, was, now)
    n1 = again.node("n1")
    job_records = len(cluster.node("n1").records(job))
    assert n1["rows"] >= job_records > 0 and n1["witness"] == "accepted"
