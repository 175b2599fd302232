"""contrib/collect-ledgers.sh end to end (shared-filesystem mode): collect, witness, merge."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from spark_slurm.clock import ManualClock
from tests.unit.head.builders import build_node

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "contrib" / "collect-ledgers.sh"
SPARKCTL = Path(sys.executable).with_name("sparkctl")


def run_script(tmp: Path, mode: str, shared: Path,
               nodes: list[str]) -> subprocess.CompletedProcess[str]:
    (tmp / "nodes.list").write_text("# head node list\n" + "\n".join(nodes) + "\n")
    env = dict(os.environ, SPARK_NODES_FILE=str(tmp / "nodes.list"), SPARK_SHARED=str(shared),
               SPARK_COLLECT=str(tmp / "collect"), SPARK_KEYS=str(tmp / "trust"),
               SPARK_WITNESS=str(tmp / "witness"), SPARK_CLUSTER_DB=str(tmp / "cluster.db"),
               SPARKCTL=str(SPARKCTL))
    return subprocess.run(["bash", str(SCRIPT), mode], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_collect_witness_and_merge_via_shared_path(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    clock = ManualClock()
    (tmp_path / "nodes").mkdir()
    for node in ("n1", "n2"):
        path = build_node(tmp_path / "nodes", node, tmp_path / "trust", clock,
                          [("100", [0], {0: 1000})])
        shutil.copy(path, shared / f"{node}.db")
    done = run_script(tmp_path, "--checkpoints", shared, ["n1", "n2"])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "witness" / "checkpoints").iterdir()) == [
        "spark_spark_n1.txt", "spark_spark_n2.txt"]
    merged = run_script(tmp_path, "--merge", shared, ["n1", "n2", "n3"])
    assert merged.returncode == 1  # n3 has no snapshot: reported, the others still merge
    assert "n3: no snapshot" in merged.stderr
    conn = sqlite3.connect(tmp_path / "cluster.db")
    counts = dict(conn.execute("SELECT name, count FROM nodes"))
    witnessed = conn.execute("SELECT count(*) FROM checkpoints WHERE source='witness'").fetchone()
    conn.close()
    assert counts["n1"] > 0 and counts["n2"] > 0 and witnessed[0] == 2
