"""Suite-wide fixtures and the rules for the `gpu` and `slurm` markers.

`slurm` tests skip only when Slurm truly cannot be had (not root, or the
packages are missing outside CI); under CI=true a missing Slurm is a failure,
because CI must run them.
"""

from __future__ import annotations

import os
import shutil

import pytest


def slurm_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "real Slurm tests need root (slurmd runs as root)"
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make system-deps installs it)"
    return None


def multinode_unavailable_reason() -> str | None:
    """Why a namespaced multi-node cluster cannot run here (None when it can)."""
    from spark_slurm.demo import netns  # noqa: PLC0415 (only the multi-node tests need it)

    return slurm_unavailable_reason() or netns.unavailable_reason()


def require(reason: str | None, what: str) -> None:
    """Skip when `reason` says this machine cannot run `what`; under CI=true, fail."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run {what}: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = slurm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        return  # the fixtures will fail loudly instead of skipping
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)
