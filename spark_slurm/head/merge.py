"""`sparkctl merge`: fold what each node wrote since the last merge into the cluster store.

Each source (a node ledger snapshot or a segment from `sparkctl ledger export`)
is read only past what the store holds of its node, and proven to continue that
chain (`plan.prepare`); what passes is stored in one transaction per node, and
everything else becomes a finding with a fixed code, the node and the seq. A
node that fails never blocks the others, and running a merge twice changes
nothing (findings are recorded once; nothing is stamped with the run time).
The nightly cost follows the new records, not the nodes' history.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import HeadDbError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.plan import Plan, prepare
from spark_slurm.head.source import node_size
from spark_slurm.head.store import (
    ClusterStore,
    Finding,
    NodeState,
    NodeWriter,
    display_url,
    open_store,
    parse_url,
)
from spark_slurm.head.witness import node_of, witnessed

CODES = ("GAP", "FORK", "ROLLBACK", "DUPLICATE", "REORDER", "TAMPERED", "FOREIGN_ORIGIN",
         "UNKNOWN_KEY", "EPOCH_GAP")

Progress = Callable[[int], None]
PARALLEL_MIN_RECORDS = 50_000  # below this, starting worker processes costs more than it saves
DEFAULT_WORKERS = 4
MAX_ATTEMPTS = 8  # a node another merge moved while this one checked it is checked again


@dataclass
class NodeResult:
    """What one source contributed to a merge."""

    source: str
    node: str | None
    appended: int = 0
    head_seq: int | None = None
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    read: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "node": self.node, "appended": self.appended,
                "head_seq": self.head_seq, "ok": self.ok, "error": self.error,
                "read": self.read, "findings": [f.to_json() for f in self.findings]}


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
                  progress: Progress | None = None, workers: int | None = None,
                  workdir: Path | None = None) -> MergeSummary:
    """Merge sources (`PATH` or `NODE=PATH`: node ledger snapshots or segments) into the
    cluster store `into` names, first taking in every checkpoint the witness at
    `witness_state` has cosigned. `progress` is called once per source.

    `workers` processes (see `worker_count`) read and check sources while this one
    stores the previous node; with one, everything runs in this process."""
    keys = KeyRing.load(keys_dir) if keys_dir is not None else None
    count = worker_count(workers, sources)
    # the workers are forked first, while this process holds no database connection
    with _checkers(count) as pool, closing(open_store(into, create=True)) as store, \
            _workdir(into, workdir) as work:
        if witness_state is not None:
            import_witnessed(store, witness_state)
        results: list[NodeResult] = []
        with store.bulk():
            plans: Iterator[Plan | str] = iter(sources) if pool is None else \
                _ahead(pool, store.url, sources, keys_dir, work, depth=2 * count)
            for item in plans:
                plan = item if isinstance(item, Plan) else prepare(store, item, keys, work)
                arg = sources[len(results)]
                results.append(apply_plan(store, plan, arg, keys, work, clock=clock))
                if progress is not None:
                    progress(1)
        return MergeSummary(display_url(store.url), results)


def merge_into(store: ClusterStore, sources: Sequence[str], keys: KeyRing | None, *,
               workdir: Path, clock: Clock = SYSTEM_CLOCK, fast: bool = True) -> MergeSummary:
    """Merge into an open store, in this process (tests compare the fast path's
    verdicts with the full checks' through `fast`)."""
    results = [apply_plan(store, prepare(store, arg, keys, workdir, fast=fast), arg, keys,
                          workdir, clock=clock, fast=fast) for arg in sources]
    return MergeSummary(display_url(store.url), results)


def apply_plan(store: ClusterStore, plan: Plan, arg: str, keys: KeyRing | None,
               workdir: Path, *, clock: Clock = SYSTEM_CLOCK, fast: bool = True) -> NodeResult:
    """Store one checked source in its own transaction. If another merge moved the
    node since the plan was made, the source is checked again against the new state."""
    try:
        for _ in range(MAX_ATTEMPTS):
            result = _try_apply(store, plan, clock)
            if result is not None:
                return result
            plan.discard()
            plan = prepare(store, arg, keys, workdir, fast=fast)
        raise HeadDbError(f"{plan.source}: node {plan.node} kept moving under other merges")
    finally:
        plan.discard()


def _try_apply(store: ClusterStore, plan: Plan, clock: Clock) -> NodeResult | None:
    result = NodeResult(source=plan.source, node=plan.node, error=plan.error,
                        read=plan.read_rows, findings=plan.findings)
    if plan.error is not None or plan.node is None:
        return result
    result.head_seq = plan.held.head_seq if plan.held is not None else None
    if plan.advance is None and not plan.checkpoints and plan.forks is None:
        if plan.findings:  # nothing to store but what was found
            with store.writer(None) as w:
                for f in plan.findings:
                    w.add_finding(f, plan.source, clock.now_ns())
        return result
    with store.writer(plan.copy) as w:
        state = w.lock_node(plan.node, plan.origin)
        if not _same(state, plan.held):
            return None
        _store(w, state, plan, clock.now_ns())
    if plan.advance is not None:
        result.appended = plan.advance.last - plan.advance.first + 1
        result.head_seq = plan.advance.last
    return result


def _same(state: NodeState, held: NodeState | None) -> bool:
    if held is None:
        return state.head_seq is None
    return (state.head_seq, state.head_hash, state.first_seq) == \
        (held.head_seq, held.head_hash, held.first_seq)


def _store(w: NodeWriter, state: NodeState, plan: Plan, now_ns: int) -> None:
    if plan.advance is not None:
        w.advance(state, plan.advance)
    for size, root, text in plan.checkpoints:
        w.add_checkpoint(state.node_id, size, root, text, "ledger")
    if plan.forks is not None:
        w.keep_forks(state.node_id, plan.forks[0], plan.forks[1], plan.source)
    for f in plan.findings:
        w.add_finding(f, plan.source, now_ns)


def worker_count(workers: int | None, sources: Sequence[str]) -> int:
    """How many checking processes a merge of `sources` gets (1: none). Asked for a
    number, that many (at most one per source); by default, up to DEFAULT_WORKERS and
    one per CPU, for sources holding at least PARALLEL_MIN_RECORDS rows."""
    if workers is None:
        if len(sources) < 2 or sum(node_size(s) for s in sources) < PARALLEL_MIN_RECORDS:
            return 1
        workers = min(DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    return max(1, min(workers, len(sources)))


@contextmanager
def _checkers(count: int) -> Iterator[ProcessPoolExecutor | None]:
    if count < 2:
        yield None
        return
    # fork, not spawn: a spawned worker re-imports the package (~0.3 s each here)
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork")) as pool:
        pool.submit(int).result()  # with fork, the first task starts every worker
        yield pool


_WORKER_STORE: dict[str, ClusterStore] = {}


def _prepare_in_worker(url: str, arg: str, keys_dir: Path | None, workdir: Path) -> Plan:
    """`prepare` in a worker process, with its own read connection to the store (kept
    for the worker's life) and its own key ring (keys do not pickle)."""
    store = _WORKER_STORE.get(url)
    if store is None:
        store = _WORKER_STORE[url] = open_store(url)
    return prepare(store, arg, KeyRing.load(keys_dir) if keys_dir is not None else None,
                   workdir)


def _ahead(pool: ProcessPoolExecutor, url: str, sources: Sequence[str],
           keys_dir: Path | None, workdir: Path, *, depth: int) -> Iterator[Plan]:
    """Each source prepared in the pool, in order, at most `depth` ahead (each holds its
    private copy on disk until it is stored)."""
    pending: deque[Future[Plan]] = deque()
    for arg in sources:
        pending.append(pool.submit(_prepare_in_worker, url, arg, keys_dir, workdir))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextmanager
def _workdir(into: str | Path, workdir: Path | None) -> Iterator[Path]:
    """A directory only this user can write for the private copies, removed afterwards:
    beside an SQLite store (copies can be large; /tmp may be memory), else `workdir`
    or the system's temporary directory."""
    scheme, target = parse_url(into)
    parent = workdir if workdir is not None else (
        Path(target).parent if scheme == "sqlite" else Path(tempfile.gettempdir()))
    try:
        tmp = tempfile.TemporaryDirectory(prefix=".spark-merge-", dir=parent)
    except OSError as exc:
        raise HeadDbError(f"{parent}: cannot make a working directory: "
                          f"{exc.strerror}") from None
    with tmp as name:
        yield Path(name)


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
