"""Fixtures that start a real single-node Slurm cluster (see cluster.py).

`slurm_cluster` is one plain cluster per session (no spark parts), for tests of
Slurm itself and of the job-context sources. Each test submits jobs with its
own names and looks them up by job id, so tests never depend on each other.
`spark_stack` is the whole product on one node (see stack.py); tests that stop
its daemon start it again before they return.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.demo.cluster import SlurmCluster
from tests.conftest import require, slurm_unavailable_reason
from tests.integration.slurm.stack import SparkStack


def require_slurm() -> None:
    """Skip (or, under CI, fail) when this machine cannot run a real cluster."""
    require(slurm_unavailable_reason(), "the real-Slurm tests")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require_slurm()
    root: Path = tmp_path_factory.mktemp("slurm-plain")
    cluster = SlurmCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def spark_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkStack]:
    """Slurm with job_submit.lua, the prolog/epilog hook and a running sparkd."""
    require_slurm()
    stack = SparkStack(tmp_path_factory.mktemp("spark-e2e")).start()
    try:
        yield stack
    finally:
        stack.stop()
