"""One real multi-node cluster shared by the multi-node tests (issue 16).

The controller and three compute nodes, each in its own network, UTS and mount
namespaces, with its own slurmd, sparkd, simulated GPUs, ledger and keys, and an
sshd the head node (the controller's namespace) collects over. Bringing it up
takes seconds, but the tests share one per module; each test collects into its
own head-node state (`head`), and `healthy` puts the cluster back the way the
next test expects (every cable plugged, every sparkd running with a true clock,
hooks fail_closed, nodes idle). No Karman streams run (each action's facility
follow-up says `unavailable`, which the audit accepts), to spare the CPUs.
Under CI=true a host that cannot run it fails the tests instead of skipping them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spark_slurm.demo.stack import ClusterStack, CollectRun, StackSpec
from tests.conftest import multinode_unavailable_reason, require

BUDGET_W = 4000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    require(multinode_unavailable_reason(), "the multi-node tests")
    stack = ClusterStack(tmp_path_factory.mktemp("multinode"), spec=StackSpec(
        nodes=3, budget_w=BUDGET_W, karman=False, exporter=False, metrics=False,
        facility_before_s=1, facility_after_s=1, cluster_name="spark-mn",
        automations={"maintain_period_s": 0.5, "checkpoint_interval_s": 1.0}))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        assert stack.topology is not None and stack.topology.leftovers() == []


@dataclass
class Head:
    """A head node's state of its own: collected copies, witness, cluster ledger."""

    stack: ClusterStack
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "cluster.db"

    def collect(self, keys: Path | None = None, max_skew_s: float = 2.0) -> CollectRun:
        """`sparkctl collect --cosign --into` on the head node, over ssh, into this state,
        once every facility follow-up is written."""
        self.stack.settle()
        return self.stack.collect(dest=self.root / "collect", into=self.db,
                                  witness=self.root / "witness", keys=keys,
                                  max_skew_s=max_skew_s)


@pytest.fixture
def head(cluster: ClusterStack, tmp_path: Path) -> Head:
    return Head(cluster, tmp_path / "head")


@pytest.fixture(autouse=True)
def healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: cables in, sparkd running everywhere with the true clock."""
    yield
    if "cluster" not in request.fixturenames:
        return
    stack: ClusterStack = request.getfixturevalue("cluster")
    assert stack.topology is not None
    stack.cluster.run(["scancel", "-u", "root"], check=False)
    for host in stack.hosts:
        stack.topology.set_link(host.name, True)
        if host.clock_offset_s or host.daemon_pid() is None:
            host.stop_daemon()
            host.start_daemon()
    stack.set_hook_mode("fail_closed")
    stack.cluster.wait_node_idle(timeout=60)
