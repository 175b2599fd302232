"""`sparkctl merge`: fold what each node wrote since the last merge into the cluster store.

Each source (a node ledger snapshot or a segment from `sparkctl ledger export`)
is read only past what the store holds of its node, proven to continue that
chain and stored in one transaction per node (`node_merge`); everything that
does not check out becomes a finding with a fixed code, the node and the seq.
A node that fails never blocks the others, and running a merge twice changes
nothing (findings are recorded once; nothing is stamped with the run time).
The nightly cost follows the new records, not the nodes' history.

On PostgreSQL, `workers` processes merge different nodes at once (the store
locks per node); SQLite has one writer, so there sources are merged in turn.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.node_merge import NodeResult, merge_source
from spark_slurm.head.store import (
    ClusterStore,
    Finding,
    NodeState,
    display_url,
    open_store,
    parse_url,
)
from spark_slurm.head.witness import node_of, witnessed

CODES = ("GAP", "FORK", "ROLLBACK", "DUPLICATE", "REORDER", "TAMPERED", "FOREIGN_ORIGIN",
         "UNKNOWN_KEY", "EPOCH_GAP")

Progress = Callable[[int], None]
DEFAULT_WORKERS = 4

__all__ = ["CODES", "MergeSummary", "NodeResult", "import_witnessed", "merge_into",
           "merge_ledgers", "positions", "worker_count"]


@dataclass
class MergeSummary:
    into: str
    results: list[NodeResult]

    @property
    def appended(self) -> int:
        return sum(r.appended for r in self.results)

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.results for f in r.findings]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {"into": self.into, "ok": self.ok, "appended": self.appended,
                "findings": [f.to_json() for f in self.findings],
                "nodes": [r.to_json() for r in self.results]}


def merge_ledgers(into: str | Path, sources: Sequence[str], *, keys_dir: Path | None = None,
                  witness_state: Path | None = None, clock: Clock = SYSTEM_CLOCK,
                  progress: Progress | None = None, workers: int | None = None
                  ) -> MergeSummary:
    """Merge sources (`PATH` or `NODE=PATH`: node ledger snapshots or segments) into the
    cluster store `into` names, first taking in every checkpoint the witness at
    `witness_state` has cosigned. `progress` is called once per source."""
    keys = KeyRing.load(keys_dir) if keys_dir is not None else None
    count = worker_count(workers, sources, into)
    with closing(open_store(into, create=True)) as store:
        if witness_state is not None:
            import_witnessed(store, witness_state)
        url = store.url
    if count > 1:
        return MergeSummary(display_url(url), _in_workers(url, sources, keys_dir, clock,
                                                          progress, count=count))
    with closing(open_store(url)) as store, closing(open_store(url)) as reads:
        results = []
        with store.bulk():
            for arg in sources:
                results.append(merge_source(store, reads, arg, keys, clock.now_ns()))
                if progress is not None:
                    progress(1)
    return MergeSummary(display_url(url), results)


def merge_into(store: ClusterStore, reads: ClusterStore, sources: Sequence[str],
               keys: KeyRing | None, *, clock: Clock = SYSTEM_CLOCK, fast: bool = True
               ) -> MergeSummary:
    """Merge into an open store (tests compare the fast path's verdicts with the full
    checks' through `fast`); `reads` is a second connection to it."""
    results = [merge_source(store, reads, arg, keys, clock.now_ns(), fast=fast)
               for arg in sources]
    return MergeSummary(display_url(store.url), results)


def worker_count(workers: int | None, sources: Sequence[str], into: str | Path = "") -> int:
    """How many processes merge at once: one for SQLite (one writer); on PostgreSQL as
    asked, by default up to DEFAULT_WORKERS and one per CPU (at most one per source)."""
    if parse_url(into)[0] != "postgresql":
        return 1
    if workers is None:
        workers = min(DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    return max(1, min(workers, len(sources)))


_WORKER: dict[str, tuple[ClusterStore, ClusterStore]] = {}


def _merge_in_worker(url: str, arg: str, keys_dir: Path | None, now_ns: int) -> NodeResult:
    """One source in a worker process, on the worker's own two connections (kept for
    its life) and key ring (keys do not pickle)."""
    if url not in _WORKER:
        _WORKER[url] = (open_store(url), open_store(url))
    store, reads = _WORKER[url]
    return merge_source(store, reads, arg, KeyRing.load(keys_dir) if keys_dir else None,
                        now_ns)


def _in_workers(url: str, sources: Sequence[str], keys_dir: Path | None, clock: Clock,
                progress: Progress | None, *, count: int) -> list[NodeResult]:
    with _pool(count) as pool:
        futures = [pool.submit(_merge_in_worker, url, arg, keys_dir, clock.now_ns())
                   for arg in sources]
        results = []
        for future in futures:
            results.append(future.result())
            if progress is not None:
                progress(1)
    return results


@contextmanager
def _pool(count: int) -> Iterator[ProcessPoolExecutor]:
    # fork, not spawn: a spawned worker re-imports the package (~0.3 s each here)
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


def import_witnessed(store: ClusterStore, state: Path) -> int:
    """Copy the witness's checkpoints into the cluster store (idempotent)."""
    cps = witnessed(state)
    for cp in cps:
        store.import_checkpoint(node_of(cp.origin), cp.origin, cp.size, cp.root.hex(),
                                cp.text, source="witness")
    return len(cps)


def positions(db: str | Path, nodes: Sequence[str] = ()) -> list[NodeState]:
    """Each node's held position (what the next segment should start after), for the
    collector: every node the store knows, or the ones named (unknown ones with no
    head: export them from the start)."""
    with closing(open_store(db)) as store:
        known = {n.name: n for n in store.nodes()}
    if not nodes:
        return list(known.values())
    return [known.get(n) or NodeState(0, n, None, None, None, 0) for n in nodes]
