"""Audit: a job across two nodes, in time order, verified, priced and plotted."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from spark_slurm.audit import audit_job
from spark_slurm.cli import cli
from spark_slurm.errors import UnknownJob
from spark_slurm.merge import merge_ledgers
from spark_slurm.tariff import flat
from tests.unit.head import tamper
from tests.unit.head.conftest import ENERGY, Cluster


def merged(c: Cluster) -> Path:
    db = c.root / "cluster.db"
    assert merge_ledgers(db, [str(c.n1), str(c.n2)], keys_dir=c.trust, clock=c.clock).ok
    return db


def test_job_on_two_nodes_in_time_order_all_verified(cluster: Cluster) -> None:
    report = audit_job(merged(cluster), "100", flat("0.30"))
    assert report.ok, report.problems
    assert {e.node for e in report.timeline} == {"n1", "n2"}
    times = [e.time_ns for e in report.timeline]
    assert times == sorted(times)
    assert all(e.verification.chain == "ok" and e.verification.proof == "ok"
               for e in report.timeline)
    kinds = [e.kind for e in report.timeline if e.node == "n1"]
    assert kinds[:2] == ["admission", "cap"] and "throttle" in kinds and "restore" in kinds
    caps = [e for e in report.timeline if e.kind == "cap"]
    assert all(e.validated and e.paths and e.paths["facility"] == "correlated" for e in caps)
    assert report.header["nodes"] == ["n1", "n2"]
    assert report.header["gpus"] == {"n1": [0, 1], "n2": [0]}


def test_energy_is_the_sum_of_recorded_gpu_counters_and_is_priced(cluster: Cluster) -> None:
    report = audit_job(merged(cluster), "100", flat("0.30"))
    expected = sum(sum(per_gpu.values()) for per_gpu in ENERGY.values())
    assert report.energy_mj == expected
    assert {(e.node, e.gpu): e.energy_mj for e in report.energy} == {
        (n, g): mj for n, gpus in ENERGY.items() for g, mj in gpus.items()}
    assert report.cost is not None
    assert str(report.cost.total.quantize(report.cost.total.__class__("0.0001"))) == "0.5250"


def test_audit_on_a_node_ledger_works_too(cluster: Cluster) -> None:
    report = audit_job(cluster.n1, "100")
    assert report.ok and report.source == "node"
    assert {e.node for e in report.timeline} == {"n1"}


def test_a_record_changed_in_the_merged_ledger_shows_as_unverified(cluster: Cluster) -> None:
    db = merged(cluster)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE records SET body = CAST(replace(body, 'alice', 'mallo') AS BLOB) "
                     "WHERE kind='cap' AND job_id='100' AND node_id="
                     "(SELECT node_id FROM nodes WHERE name='n2')")
    conn.close()
    report = audit_job(db, "100")
    assert not report.ok
    bad = [e for e in report.timeline if not e.verification.ok]
    assert [(e.node, e.kind) for e in bad] == [("n2", "cap")]
    assert bad[0].verification.chain == "hash mismatch"
    assert any("n2 seq" in p and "fails verification" in p for p in report.problems)


def test_unknown_job_is_an_input_error(cluster: Cluster) -> None:
    with pytest.raises(UnknownJob, match="job 4242"):
        audit_job(merged(cluster), "4242")


def test_cli_json_plot_and_exit_codes(cluster: Cluster, tmp_path: Path) -> None:
    db = merged(cluster)
    png = tmp_path / "job.png"
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", "100", "--db", str(db), "--json", "--plot", str(png),
                                 "--price-kwh", "0.25"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["version"] == 1 and doc["verdict"]["ok"] is True
    assert doc["energy"]["total_mj"] == 6_300_000_000 and doc["energy"]["total_kwh"] == "1.750000"
    assert doc["cost"]["total"] == "0.437500" and doc["cost"]["currency"] == "EUR"
    assert {"node", "seq", "time_ns", "kind", "verified", "chain", "proof", "paths",
            "validated", "summary", "requester", "authority", "hash", "gpus"} <= \
        set(doc["timeline"][0])
    assert png.stat().st_size > 10_000
    from matplotlib import image  # noqa: PLC0415

    pixels = image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels.std() > 0.01  # not a blank canvas
    text = runner.invoke(cli, ["audit", "100", "--db", str(db)])
    assert text.exit_code == 0 and "VERDICT: all" in text.output and "✓" in text.output
    missing = runner.invoke(cli, ["audit", "4242", "--db", str(db)])
    assert missing.exit_code != 0


def test_svg_plot(cluster: Cluster, tmp_path: Path) -> None:
    svg = tmp_path / "job.svg"
    audit_job(merged(cluster), "100", plot=svg)
    assert svg.read_text().lstrip().startswith("<?xml") and svg.stat().st_size > 10_000


def test_merge_findings_on_a_jobs_node_fail_the_verdict(cluster: Cluster) -> None:
    tamper.sql(cluster.n2, "DELETE FROM per WHERE seq = 6")
    db = cluster.root / "cluster.db"
    merge_ledgers(db, [str(cluster.n1), str(cluster.n2)], keys_dir=cluster.trust,
                  clock=cluster.clock)
    report = audit_job(db, "100")
    assert not report.ok
    assert any(p.startswith("merge finding on n2: GAP seq 6") for p in report.problems)
    node_report = audit_job(cluster.n2, "100")
    assert any("GAP seq 6" in p for p in node_report.problems)
