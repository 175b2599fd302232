"""`make test` includes the demo: every scenario on a real Slurm cluster must pass.

Runs the whole system (munge, slurmctld, three slurmd in their own network
namespaces, a sparkd per host, sim GPUs, Karman streams, the head node's
collection over ssh) through the same library entry point as `sparkctl demo`,
then checks what a user relies on: each scenario's assertions held, both ledger
verifiers agree, the plots exist, and nothing is left running: no process, no
namespace, no link. A second test drives the command line with --keep and --stop
as a user would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from spark_slurm.demo import netns
from spark_slurm.demo.run import run_demo
from spark_slurm.demo.scenarios import SCENARIOS
from spark_slurm.ledger.verify import verify_ledger
from tests.conftest import multinode_unavailable_reason, require

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SPARKCTL = [sys.executable, "-m", "spark_slurm.cli"]
REPO = Path(__file__).resolve().parents[3]


def _require_slurm() -> None:
    require(multinode_unavailable_reason(), "the demo on a multi-node cluster")


def _namespaces_of(root: Path) -> list[str]:
    """Network namespaces and links the demo in `root` made that still exist."""
    saved = root / "net" / "topology.json"
    assert saved.is_file(), "the demo recorded no namespaces"
    topo = netns.Topology.from_json(json.loads(saved.read_text()))
    mounts = [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if topo.prefix in line]
    return topo.leftovers() + mounts


def _processes_under(root: Path) -> list[str]:
    """Command lines of live processes that mention the demo's directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(root) in cmd and state != "Z":
            found.append(cmd)
    return found


@pytest.mark.timeout(900)
def test_every_demo_scenario_passes_and_the_ledger_proves_it(tmp_path: Path) -> None:
    _require_slurm()
    root = tmp_path / "demo"
    lines: list[str] = []
    result = run_demo((), root, keep=False, say=lines.append)

    assert [s.name for s in result.scenarios] == list(SCENARIOS)
    assert result.ok, "\n".join(result.failures()) + "\n" + "\n".join(lines[-40:])
    for scenario in result.scenarios:
        assert scenario.job_ids, scenario.name
        assert len(scenario.checks) >= 5, (scenario.name, scenario.checks)
    names = {c.name for c in result.checks}
    assert "contrib/verify-ledger.sh agrees" in names
    assert all(c.ok for c in result.checks)

    assert result.scenarios[-1].name == "multi-node"
    # the incident's job fails its audit on purpose, with exactly the record it caused
    incident = next(s for s in result.scenarios if s.name == "incident")
    [(job, problems)] = incident.expected_problems.items()
    assert len(problems) == 1 and problems[0].endswith("(cap) not validated: readback=mismatch")
    audit = next(c for c in result.checks if c.name == f"audit of job {job}")
    assert audit.ok and "only the problem its story caused" in audit.detail
    assert "head node collection (sparkctl collect --cosign --into)" in names
    # the kept copy verifies on its own, and tampering with it is caught
    copy = root / "results" / "ledger.db"
    key = (root / "nodes" / "n1" / "keys" / "hmac.key").read_text().strip()
    assert verify_ledger(copy, bytes.fromhex(key)).ok
    script = REPO / "contrib" / "verify-ledger.sh"
    subprocess.run(["sqlite3", str(copy), "UPDATE per SET body = CAST(REPLACE("
                    "CAST(body AS TEXT), '\"verdict\":\"correlated\"', "
                    "'\"verdict\":\"flagged\"') AS BLOB) WHERE kind = 'facility'"],
                   check=True)
    assert not verify_ledger(copy, bytes.fromhex(key)).ok
    assert subprocess.run(["bash", str(script), str(copy)], capture_output=True,
                          check=False).returncode == 1

    plots = sorted((root / "plots").glob("job-*.png"))
    jobs = [j for s in result.scenarios for j in s.job_ids]
    assert len(plots) == len(jobs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    report = json.loads((root / "results" / "demo.json").read_text())
    assert report["ok"] is True and len(report["scenarios"]) == len(SCENARIOS)
    assert all(line[2] == ":" and line[5] == ":" for line in lines)   # HH:MM:SS stamps
    assert any("VALID" in line and "seq" in line for line in lines)   # audits were shown
    # every audit re-checked each record's MAC with the node's key (the demo's trust/ dir)
    assert sum("verdict: all records verified (chain, proof, MAC)" in line for line in lines) \
        == len(jobs)
    assert _processes_under(root) == []
    assert _namespaces_of(root) == []
    assert not (root / "demo.json").exists()


@pytest.mark.timeout(300)
def test_keep_leaves_a_usable_cluster_and_stop_ends_it(tmp_path: Path) -> None:
    _require_slurm()
    root = tmp_path / "kept"
    run = subprocess.run([*SPARKCTL, "demo", "oob", "--keep", "--workdir", str(root)],
                         capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "sparkctl demo --stop" in run.stdout
    try:
        state = json.loads((root / "demo.json").read_text())
        env = dict(os.environ, SLURM_CONF=state["slurm_conf"])
        status = subprocess.run([*SPARKCTL, "status", "--socket", state["socket"], "--json"],
                                capture_output=True, text=True, timeout=30, check=True)
        assert len(json.loads(status.stdout)["gpus"]) == 8
        assert [h["name"] for h in state["hosts"]] == ["ctl", "n1", "n2", "n3"]
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], env=env, capture_output=True,
                               text=True, timeout=30, check=True).stdout.split()
        assert sorted(set(nodes)) == ["n1", "n2", "n3"]
        job = subprocess.run(["sbatch", "--parsable", "--gres=gpu:1,gpupower:300",
                              "--wrap=true"], env=env, capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        assert job.isdigit()
        prom = (root / "prometheus.yml").read_text()
        assert state["metrics"].split("//")[1].split("/")[0] in prom
        # every sparkd metric the Grafana dashboard queries is one sparkd really serves
        with urllib.request.urlopen(state["metrics"], timeout=10) as resp:
            served = resp.read().decode()
        dashboard = (REPO / "contrib" / "grafana" / "sparkd-dashboard.json").read_text()
        wanted = set(re.findall(r"\b(spark_[a-z_]+?)(?:_total|_bucket)?\{", dashboard))
        missing = [m for m in wanted if not re.search(rf"^# TYPE {m}(_total)? ", served, re.M)]
        assert wanted and not missing, missing
    finally:
        stop = subprocess.run([*SPARKCTL, "demo", "--stop", str(root)], capture_output=True,
                              text=True, timeout=120, check=False)
    assert stop.returncode == 0, stop.stderr
    assert "stopped sparkd" in stop.stdout and "stopped netns" in stop.stdout
    assert _processes_under(root) == []
    assert _namespaces_of(root) == []
    again = subprocess.run([*SPARKCTL, "demo", "--stop", str(root)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert again.returncode == 2 and "no running demo" in again.stderr
