"""The installed admin files against the real tools that consume them: systemd-analyze
on the rendered units, promtool on the alert rules (and their unit tests), the rules'
metric names against what sparkd and the exporter really export, and the merge unit's
collect-ledgers.sh run with nothing but the unit's environment, over a non-interactive
"ssh" whose PATH lacks the package's bin/ (as sshd gives)."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from spark_slurm.clock import ManualClock
from spark_slurm.daemon.metrics import DaemonMetrics
from spark_slurm.files import Layout, install
from spark_slurm.gpu.backend import Sample
from spark_slurm.karman.exporter import QUANTITIES
from spark_slurm.karman.subscriber import COUNTERS
from tests.unit.head.builders import build_node

UNITS = ("sparkd.service", "karman-exporter.service", "spark-merge.service", "spark-merge.timer",
         "spark-checkpoint.service", "spark-checkpoint.timer")
SHARE = Path("usr/local/share/spark-slurm")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (scripts/system-deps.sh installs it)")
        pytest.skip(f"{name} not installed (scripts/system-deps.sh installs it)")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Everything `sparkctl files install` writes, under a scratch root."""
    root = tmp_path / "root"
    root.mkdir()
    install(Layout.current(allow_ips=("192.0.2.0/24",)), root)
    return root


def test_rendered_units_pass_systemd_analyze_verify(tree: Path) -> None:
    analyze = _tool("systemd-analyze")
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    # systemd checks that every ExecStart= exists: show it the tree as the host will
    # have it, /usr/local included, in a mount namespace of its own
    units = tree / "etc/systemd/system"
    script = (f"mount --bind {tree / 'usr/local'} /usr/local && cd {units} && "
              f"{analyze} verify {' '.join(UNITS)}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # and it does catch a unit whose command is not where the unit says
    (tree / "usr/local/libexec/spark/collect-ledgers.sh").unlink()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "collect-ledgers.sh is not executable" in done.stderr


def test_alert_rules_check_and_their_unit_tests_pass(tree: Path) -> None:
    promtool = _tool("promtool")
    rules = tree / SHARE / "prometheus" / "spark-rules.yml"
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([promtool, "test", "rules", "spark-rules.test.yml"],
                          cwd=rules.parent, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for config in ("demo-prometheus.yml", "karman-scrape.yml"):
        done = subprocess.run([promtool, "check", "config", "--syntax-only", config],
                              cwd=rules.parent, capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def _exported_names() -> set[str]:
    """Every metric family name sparkd's /metrics and the Karman exporter serve."""
    metrics = DaemonMetrics("n1", karman_stats=lambda: {"decoded": 1}, rate_limited=lambda: 0)
    metrics.observe_sample(0, Sample(time_ns=1, power_mw=1, energy_mj=1, temp_mc=1,
                                     util_pct=1, reasons=0, enforced_mw=1), 1)
    metrics.observe_commit("facility", {"verdict": "flagged"}, 3)
    metrics.observe_latency("prolog", 0.01)
    metrics.count("drift")
    metrics.jobs.labels("n1").set(1)
    text = metrics.render().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    names |= {metric for _, metric, _ in QUANTITIES}
    names |= {f"karman_{c}_total" for c in COUNTERS}
    names |= {"karman_window_cycles", "karman_last_cycle_age_seconds", "up"}
    return names


def test_alert_rules_watch_metrics_that_exist() -> None:
    rules = yaml.safe_load((Path(__file__).resolve().parents[3] / "contrib" / "prometheus" /
                            "spark-rules.yml").read_text())
    exported = _exported_names()
    used: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r'\{[^}]*\}|"[^"]*"', "", rule["expr"])
            used |= {n for n in re.findall(r"[a-z_][a-z0-9_]*", expr)
                     if n.startswith(("spark_", "karman_")) or n == "up"}
    assert used and used <= exported, sorted(used - exported)


def test_merge_unit_finds_sparkctl_with_only_its_environment(tree: Path, tmp_path: Path) -> None:
    unit = (tree / "etc/systemd/system/spark-merge.service").read_text()
    env = dict(re.findall(r"^Environment=([A-Z_]+)=(.*)$", unit, re.MULTILINE))
    command = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.MULTILINE)
    assert command is not None and "PATH" in env and "SPARKCTL" in env
    script = tree / command.group(1).lstrip("/")
    # one node, reached through an "ssh" that runs the command here the way sshd runs a
    # non-interactive one: a bare environment whose PATH lacks the package's bin/
    node = f"pk{os.getpid()}"
    ledger = build_node(tmp_path / "nodes", node, tmp_path / "trust", ManualClock(),
                        [("100", [0], {0: 1000})])
    ssh = tmp_path / "fake-ssh"
    ssh.write_text('#!/bin/sh\nshift\nexec env -i PATH=/usr/bin:/bin HOME=/ sh -c "$*"\n')
    ssh.chmod(0o755)
    (tmp_path / "nodes.list").write_text(f"{node}\n")
    env.update(SPARK_NODES_FILE=str(tmp_path / "nodes.list"), SPARK_LEDGER=str(ledger),
               SPARK_COLLECT=str(tmp_path / "collect"), SPARK_KEYS=str(tmp_path / "trust"),
               SPARK_WITNESS=str(tmp_path / "witness"),
               SPARK_CLUSTER_DB=str(tmp_path / "cluster.db"), SPARK_SSH=str(ssh))
    try:
        done = subprocess.run([str(script), command.group(2)], env=env, capture_output=True,
                              text=True, timeout=180, check=False)
    finally:
        Path(f"/tmp/spark-snapshot-{node}.db").unlink(missing_ok=True)
    assert done.returncode == 0, done.stdout + done.stderr
    conn = sqlite3.connect(tmp_path / "cluster.db")
    counts = dict(conn.execute("SELECT name, count FROM nodes"))
    conn.close()
    assert counts.get(node, 0) > 0
