"""The shapes sparkd needs from the ledger, policy, facility stream and job context.

Written as structural Protocols (per docs/architecture.md) so the daemon's logic
depends on behaviour, not on the concrete classes, and unit tests can hand in
small fakes while `main` wires the real parts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol


class ReceiptLike(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def hash(self) -> str: ...


class RecordLike(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def hash(self) -> str: ...

    @property
    def body(self) -> dict[str, Any]: ...


class LedgerLike(Protocol):
    """The single-writer PER ledger (spark_slurm.ledger.Ledger)."""

    def append_many(self, items: Sequence[tuple[str, Mapping[str, Any]]]) -> Sequence[Any]: ...

    def records(self, job_id: str | None = None, since: int | None = None,
                kinds: Sequence[str] | None = None) -> Iterator[Any]: ...

    def records_newest_first(self, kinds: Sequence[str] | None = None) -> Iterator[Any]: ...

    def latest_ingested(self, source: str) -> Any | None: ...

    def head(self) -> Any: ...

    def close(self) -> None: ...


class DecisionLike(Protocol):
    @property
    def action(self) -> str: ...

    @property
    def requested_mw(self) -> int: ...

    @property
    def granted_mw(self) -> int: ...

    @property
    def rule(self) -> str: ...

    @property
    def reason(self) -> str: ...


class PolicyLike(Protocol):
    """A loaded site policy (spark_slurm.policy.Policy)."""

    @property
    def sha256(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def settings(self) -> Any: ...

    def evaluate(self, request: Any) -> Any: ...


class FacilityWindowLike(Protocol):
    @property
    def mean_mw(self) -> int: ...

    @property
    def min_mw(self) -> int: ...

    @property
    def max_mw(self) -> int: ...

    @property
    def samples(self) -> int: ...

    @property
    def gaps(self) -> int: ...


class FacilityStream(Protocol):
    """Rack power windows (spark_slurm.karman.KarmanSubscriber)."""

    def window(self, t0_ns: int, t1_ns: int) -> Any: ...

    def stats(self) -> Mapping[str, Any]: ...


class JobContextSource(Protocol):
    """Job facts from the scheduler (spark_slurm.slurm context sources)."""

    def get(self, job_id: str) -> Any: ...
