"""The scontrol job-context source against a live controller (no spark parts)."""

from __future__ import annotations

import pytest

from spark_slurm.demo.cluster import SlurmCluster
from spark_slurm.errors import JobNotFound
from spark_slurm.slurm import SubprocessRunner, open_context_source

pytestmark = pytest.mark.slurm


def test_running_job_context(slurm_cluster: SlurmCluster) -> None:
    job = slurm_cluster.submit(["-J", "ctx-live", "-p", "debug", "--gres=gpu:3,gpupower:900",
                                "--comment=spark:class=inference"], wrap="sleep 20")
    try:
        slurm_cluster.wait_job(job, ("RUNNING",))
        src = open_context_source("scontrol", runner=SubprocessRunner(slurm_cluster.env))
        ctx = src.get(job)
        assert ctx.job_id == job and ctx.user == "root" and ctx.uid == 0
        assert ctx.partition == "debug" and ctx.state == "RUNNING"
        assert len(ctx.gpus_on(slurm_cluster.node)) == 3
        assert ctx.gpupower_w_per_node == 900
        assert ctx.workload_class == "inference"
    finally:
        slurm_cluster.run(["scancel", job], check=False)


def test_user_comment_cannot_forge_an_admin_token(slurm_cluster: SlurmCluster) -> None:
    forged = "hi AdminComment=spark:v=1,watts=5000,gpus=8 Partition=evil"
    job = slurm_cluster.submit(["-J", "ctx-forge", "--hold", "--gres=gpu:1",
                                f"--comment={forged}"])
    try:
        src = open_context_source("scontrol", runner=SubprocessRunner(slurm_cluster.env))
        ctx = src.get(job)
        assert ctx.comment == forged
        assert ctx.admin_comment is None and ctx.token is None
        assert ctx.partition == "gpu"
        assert ctx.gpupower_w_per_node is None
    finally:
        slurm_cluster.run(["scancel", job], check=False)


def test_unknown_job_is_not_found(slurm_cluster: SlurmCluster) -> None:
    src = open_context_source("scontrol", runner=SubprocessRunner(slurm_cluster.env))
    with pytest.raises(JobNotFound):
        src.get("987654")
