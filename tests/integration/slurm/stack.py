"""The one cluster stack (spark_slurm/demo/stack.py) as the single-node real-Slurm tests use it.

One node on this host: 8 simulated B200 GPUs, a 4000 W gpupower budget (below
8 x 700 W, so power, not the GPU count, can be the limit), the shipped policy
compiled to Lua, the prolog/epilog/NHC wrappers, and sparkd with the scontrol job
context. No Karman stream (facility disabled) and no metrics endpoint, which keeps
these tests fast. The daemon can be stopped and restarted (the daemon-down cases).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from spark_slurm.demo.stack import ClusterStack, StackSpec
from spark_slurm.ledger.records import Record

GPU_TYPE = "b200"
NODE_BUDGET_W = 4000


class SparkStack(ClusterStack):
    def __init__(self, root: Path, daemon_extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(root, spec=StackSpec(
            nodes=1, gpu_model=GPU_TYPE, budget_w=NODE_BUDGET_W, facility=False,
            exporter=False, metrics=False, cluster_name="spark",
            daemon_extra=dict(daemon_extra or {})))


def bodies(records: list[Record]) -> Iterator[dict[str, Any]]:
    for rec in records:
        yield rec.body
