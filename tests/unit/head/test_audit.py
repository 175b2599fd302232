"""Audit: a job across two nodes, in time order, verified, priced and plotted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from spark_slurm.cli import cli, run
from spark_slurm.errors import CheckFailed, UnknownJob
from spark_slurm.head.audit import audit_job
from spark_slurm.head.merge import merge_ledgers
from spark_slurm.head.tariff import flat
from tests.unit.head import tamper
from tests.unit.head.conftest import ENERGY, Cluster
from tests.unit.head.stores import execute

pytestmark = pytest.mark.both_stores


def merged(c: Cluster) -> str:
    assert merge_ledgers(c.db, [str(c.n1), str(c.n2)], keys_dir=c.trust, clock=c.clock).ok
    return c.db


# the same edit in each store's dialect (SQLite | PostgreSQL)
EDITS = {
    "body": ("body = CAST(replace(body, 'alice', 'mallo') AS BLOB)",
             "body = convert_to(replace(convert_from(body, 'UTF8'), 'alice', 'mallo'), 'UTF8')"),
    "zero mac": ("mac = zeroblob(32)", "mac = decode(repeat('00', 32), 'hex')"),
    "no mac": ("mac = NULL", "mac = NULL"),
    "epoch": ("key_id = substr(key_id, 1, instr(key_id, ':')) || '1000000000000'",
              "key_id = split_part(key_id, ':', 1) || ':1000000000000'"),
}


def edit_job_record(db: str, node: str, kind: str, edit: str) -> None:
    """Tamper with the cluster store: `edit` (EDITS) on job 100's `kind` record of `node`."""
    assignment = EDITS[edit][0 if not db.startswith("postgres") else 1]
    execute(db, f"UPDATE records SET {assignment} WHERE kind=? AND job_id='100' AND "
            "node_id=(SELECT node_id FROM nodes WHERE name=?)", (kind, node))


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
    edit_job_record(db, "n2", "cap", "body")
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
    db = cluster.db
    merge_ledgers(db, [str(cluster.n1), str(cluster.n2)], keys_dir=cluster.trust,
                  clock=cluster.clock)
    report = audit_job(db, "100")
    assert not report.ok
    assert any(p.startswith("merge finding on n2: GAP seq 6") for p in report.problems)
    node_report = audit_job(cluster.n2, "100")
    assert any("GAP seq 6" in p for p in node_report.problems)


def _wrong_trust(c: Cluster) -> Path:
    """A trust store whose n2.hmac is some other node's key (n1's)."""
    bad = c.root / "wrong-trust"
    shutil.copytree(c.trust, bad)
    shutil.copy(c.trust / "n1.hmac", bad / "n2.hmac")
    return bad


def test_keys_recheck_every_mac_on_the_merged_ledger(cluster: Cluster) -> None:
    db = merged(cluster)
    plain = audit_job(db, "100")
    assert plain.ok and {e.verification.mac for e in plain.timeline} == {"unchecked"}
    checked = audit_job(db, "100", keys_dir=cluster.trust)
    assert checked.ok, checked.problems
    assert {e.verification.mac for e in checked.timeline} == {"ok"}
    wrong = audit_job(db, "100", keys_dir=_wrong_trust(cluster))
    assert not wrong.ok
    bad = {(e.node, e.verification.mac) for e in wrong.timeline if not e.verification.ok}
    assert bad and {node for node, _ in bad} == {"n2"}
    assert all(mac.startswith("MAC made with key ") for _, mac in bad)
    assert any("n2 seq" in p and "mac MAC made with key" in p for p in wrong.problems)


def test_a_mac_edited_in_the_merged_ledger_fails_only_with_keys(cluster: Cluster) -> None:
    db = merged(cluster)
    edit_job_record(db, "n1", "restore", "zero mac")
    edit_job_record(db, "n2", "admission", "no mac")
    assert audit_job(db, "100").ok  # the MAC is not part of the hash chain
    report = audit_job(db, "100", keys_dir=cluster.trust)
    bad = {(e.node, e.kind): e.verification.mac for e in report.timeline
           if not e.verification.ok}
    assert bad == {("n1", "restore"): "MAC mismatch", ("n2", "admission"): "MAC missing"}
    assert not report.ok



def test_a_key_id_naming_an_impossible_epoch_fails_without_deriving_it(
        cluster: Cluster) -> None:
    db = merged(cluster)
    edit_job_record(db, "n1", "cap", "epoch")
    report = audit_job(db, "100", keys_dir=cluster.trust)
    [bad] = [e for e in report.timeline if not e.verification.ok]
    assert (bad.node, bad.kind) == ("n1", "cap")
    assert bad.verification.mac.startswith("key id names epoch 1000000000000, past any")


def test_keys_on_a_node_ledger_check_it_as_merge_would(cluster: Cluster) -> None:
    report = audit_job(cluster.n2, "100", keys_dir=cluster.trust)
    assert report.ok and {e.verification.mac for e in report.timeline} == {"ok"}
    # n2's genesis names another HMAC key: nothing verifies, and the error says so
    with pytest.raises(CheckFailed, match=r"n2\.db: job 100 cannot be audited: UNKNOWN_KEY "
                                          r"seq 0: genesis names HMAC key"):
        audit_job(cluster.n2, "100", keys_dir=_wrong_trust(cluster))


def test_cli_keys_exit_codes_and_marks(cluster: Cluster, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    db = merged(cluster)
    runner = CliRunner()
    good = runner.invoke(cli, ["audit", "100", "--db", str(db), "--keys", str(cluster.trust)])
    assert good.exit_code == 0, good.output
    assert "proof+mac" in good.output
    doc = json.loads(runner.invoke(cli, ["audit", "100", "--db", str(db), "--json", "--keys",
                                         str(cluster.trust)]).output)
    assert {e["mac"] for e in doc["timeline"]} == {"ok"}
    bad = runner.invoke(cli, ["audit", "100", "--db", str(db), "--keys",
                              str(_wrong_trust(cluster))])
    assert bad.exit_code == 1 and "MAC!" in bad.output and "Traceback" not in bad.output
    assert run(["audit", "100", "--db", str(db), "--keys", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparkctl: ") and "nowhere: keys directory does not exist" in err
    assert "Traceback" not in err
