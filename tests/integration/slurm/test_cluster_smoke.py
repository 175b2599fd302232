"""The throwaway cluster itself: jobs run, GRES are allocated, teardown is clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.demo.cluster import SlurmCluster
from spark_slurm.errors import SparkError

pytestmark = pytest.mark.slurm


def test_batch_job_runs_and_sees_its_gpus(slurm_cluster: SlurmCluster) -> None:
    job = slurm_cluster.submit(["-J", "smoke-run", "--gres=gpu:2,gpupower:800"],
                               wrap="echo GPUS=$SLURM_GPUS_ON_NODE")
    assert slurm_cluster.wait_job(job) == "COMPLETED"
    out = (slurm_cluster.out_dir / f"{job}.out").read_text()
    assert "GPUS=2" in out


def test_gpupower_budget_is_consumable(slurm_cluster: SlurmCluster) -> None:
    # 5600 W per node: a job asking for more than the node has can never run.
    res = slurm_cluster.sbatch(["-J", "smoke-over", "--gres=gpu:1,gpupower:6000"],
                               check=False)
    assert res.returncode != 0
    assert "not available" in res.stderr


def test_stop_is_safe_on_a_cluster_that_never_started(tmp_path: Path) -> None:
    cluster = SlurmCluster(tmp_path)
    cluster.stop()   # nothing started: must not raise
    assert cluster.procs == {}


def test_unknown_job_is_a_clear_error(slurm_cluster: SlurmCluster) -> None:
    with pytest.raises(SparkError, match="Invalid job id"):
        slurm_cluster.job_state("999999")
