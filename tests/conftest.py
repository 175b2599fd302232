"""Suite-wide fixtures and the rules for the `gpu` and `slurm` markers.

`slurm` tests skip only when Slurm truly cannot be had (not root, or the
packages are missing outside CI); under CI=true a missing Slurm is a failure,
because CI must run them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FakeNvmlFactory = Callable[..., tuple[Any, Any]]


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


@pytest.fixture(scope="session")
def fake_nvml_lib() -> Iterator[Path]:
    """A directory holding a fake libnvidia-ml.so.1 compiled for this run (gcc).

    World-readable (not under pytest's root-only tmp dir), because some tests load
    it in a process that has switched to another uid."""
    from tests.unit.gpu.fakenvml import build  # noqa: PLC0415 (only NVML tests need it)

    out = Path(tempfile.mkdtemp(prefix="spark-fakenvml-"))
    out.chmod(0o755)
    try:
        yield build(out).parent
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def fake_nvml(fake_nvml_lib: Path) -> Iterator[FakeNvmlFactory]:
    """Start NvmlBackends on the fake library: `node, gpu = fake_nvml(gpus, **options)`.

    `state=PATH` opens another backend on an existing node's state; `as_uid=N` runs
    that backend as uid N. State files live in a world-readable temp dir."""
    from tests.unit.gpu.fakenvml import FakeNode, RemoteNvml  # noqa: PLC0415

    opened: list[RemoteNvml] = []
    where = Path(tempfile.mkdtemp(prefix="spark-fakenvml-state-"))
    where.chmod(0o755)

    def start(gpus: list[Any], state: Path | None = None, **options: Any) -> tuple[Any, Any]:
        path = state or where / f"state-{len(opened)}"
        node = FakeNode.create(path, gpus) if state is None else FakeNode(path)
        path.chmod(0o666)
        options.setdefault("reinit_interval_s", 0.0)
        gpu = RemoteNvml(node.env(fake_nvml_lib), **options)
        opened.append(gpu)
        return node, gpu

    try:
        yield start
    finally:
        for gpu in opened:
            gpu.close()
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL 15 server for one test; the URL of its `postgres` database."""
    from tests.pg import PgServer  # noqa: PLC0415

    server = PgServer(prefix="karman-pg-")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL 15 server shared by a session's tests (each takes a database)."""
    from tests.pg import PgServer  # noqa: PLC0415

    server = PgServer(durable=False)
    try:
        yield server
    finally:
        server.stop()
