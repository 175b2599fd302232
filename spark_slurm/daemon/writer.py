"""The one thread that writes the ledger, committing coinciding requests together.

The ledger is single-writer and every append is fsynced, so requests that arrive
together are drained from a queue and committed in one transaction (one fsync);
each caller then gets its own receipt. Queue order is ledger order, which lets the
request pipeline keep GPU actions and their PERs in the same order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from spark_slurm.daemon.contracts import LedgerLike, ReceiptLike

log = logging.getLogger("sparkd.writer")

CommitHook = Callable[[str, Mapping[str, Any], ReceiptLike], None]


@dataclass(slots=True)
class _Item:
    kind: str
    body: Mapping[str, Any]
    future: Future[ReceiptLike]


class LedgerWriter:
    """Owns the ledger: `submit` from any thread, one writer thread commits."""

    def __init__(self, ledger: LedgerLike, *, max_batch: int = 512,
                 maintain_period_s: float = 5.0,
                 on_commit: CommitHook | None = None) -> None:
        self._ledger = ledger
        self._max_batch = max_batch
        self._maintain_period_s = maintain_period_s
        self._on_commit = on_commit
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._stopped = threading.Event()
        self.batches = 0
        self.committed = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, kind: str, body: Mapping[str, Any]) -> Future[ReceiptLike]:
        """Queue one PER; the future resolves once it is durable (or fails)."""
        future: Future[ReceiptLike] = Future()
        if self._stopped.is_set():
            future.set_exception(RuntimeError("ledger writer is stopped"))
            return future
        self._queue.put(_Item(kind, body, future))
        return future

    def commit(self, kind: str, body: Mapping[str, Any], timeout: float = 30.0) -> ReceiptLike:
        """Submit and wait for durability."""
        return self.submit(kind, body).result(timeout)

    def stop(self) -> None:
        """Commit what is queued, then stop the thread (the ledger stays open)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_maintain = time.monotonic()
        while True:
            try:
                first = self._queue.get(timeout=max(0.05, self._maintain_period_s / 2))
            except queue.Empty:
                first = None
                if self._stopped.is_set():
                    return
            else:
                if first is None:
                    self._drain_and_commit([])
                    return
            batch = [first] if first is not None else []
            stop_after = self._drain_into(batch)
            if batch:
                self._commit(batch)
            if stop_after:
                return
            if time.monotonic() - last_maintain >= self._maintain_period_s:
                last_maintain = time.monotonic()
                self._maintain()

    def _drain_into(self, batch: list[_Item]) -> bool:
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                if batch:
                    self._commit(batch)
                    batch.clear()
                self._drain_and_commit([])
                return True
            batch.append(item)
        return False

    def _drain_and_commit(self, batch: list[_Item]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                batch.append(item)
        if batch:
            self._commit(batch)

    def _commit(self, batch: Sequence[_Item]) -> None:
        try:
            receipts = list(self._ledger.append_many([(i.kind, i.body) for i in batch]))
        except Exception as exc:
            if len(batch) == 1:
                log.error("ledger append of %s failed: %s", batch[0].kind, exc)
                batch[0].future.set_exception(exc)
                return
            # One bad body must not sink its neighbours: retry one by one.
            for item in batch:
                self._commit([item])
            return
        self.batches += 1
        self.committed += len(batch)
        for item, receipt in zip(batch, receipts, strict=True):
            if self._on_commit is not None:
                try:
                    self._on_commit(item.kind, item.body, receipt)
                except Exception:
                    log.exception("commit hook failed for %s", item.kind)
            item.future.set_result(receipt)

    def _maintain(self) -> None:
        maintain = getattr(self._ledger, "maintain", None)
        if maintain is None:
            return
        try:
            records = maintain()
        except Exception as exc:
            log.error("ledger maintenance failed: %s", exc)
            return
        if records:
            log.info("ledger maintenance wrote %s", records)
