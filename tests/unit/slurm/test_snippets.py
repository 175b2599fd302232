"""The slurm/ files an admin installs agree with each other and with the tested cluster."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from spark_slurm.demo.cluster import ClusterSpec, SlurmCluster

SLURM_DIR = Path(__file__).parents[3] / "slurm"


def conf_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith(("NodeName=", "PartitionName=")):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_snippet_settings_are_the_ones_the_real_cluster_tests_use(tmp_path: Path) -> None:
    snippet = conf_pairs((SLURM_DIR / "slurm.conf.snippet").read_text())
    cluster = SlurmCluster(tmp_path, ClusterSpec(
        prolog=Path("/p"), epilog=Path("/e"), health_check=Path("/h"),
        job_submit_files=(SLURM_DIR / "job_submit.lua",)))
    cluster.ctld_port = cluster.slurmd_port = 1
    tested = conf_pairs(cluster.slurm_conf_text())
    for key in ("GresTypes", "PrologFlags", "JobSubmitPlugins", "PrologEpilogTimeout",
                "HealthCheckInterval"):
        assert snippet[key] == tested[key], key
    for key in ("Prolog", "Epilog", "HealthCheckProgram"):
        assert key in snippet and key in tested


def test_gres_budget_matches_the_node_line() -> None:
    node = re.search(r"gpupower:(\d+)", (SLURM_DIR / "slurm.conf.snippet").read_text())
    gres = re.search(r"Name=gpupower Count=(\d+) Flags=CountOnly",
                     (SLURM_DIR / "gres.conf.snippet").read_text())
    assert node and gres and node.group(1) == gres.group(1)


def test_wrappers_are_posix_sh_with_every_placeholder() -> None:
    for name in ("prolog", "epilog", "spark-nhc-check"):
        path = SLURM_DIR / name
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n")
        assert path.stat().st_mode & 0o111, f"{name} is not executable"
        for placeholder in ("@PYTHON@", "@PKGDIR@", "@HOOK_CONFIG@"):
            assert placeholder in text, (name, placeholder)
        res = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, res.stderr
