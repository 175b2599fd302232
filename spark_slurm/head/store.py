"""The cluster store: where the head node keeps every node's merged chain.

One Protocol, two implementations chosen by the `--db` URL: SQLite (the embedded
default, `sqlite_store`) and PostgreSQL (`pg_store`, for sites that already run
a database server for slurmdbd). Merge writes through `NodeWriter`, one
transaction per node; audit and replay read through `ClusterReads`, which a node
ledger also offers (`node_view`), so the same report is built from either.

Records come back as `ledger.Record` with `node` set: the one record type.
Hashes and MACs are the node ledger's raw bytes, stored unchanged, so any node's
chain can be verified on its own from the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from spark_slurm.errors import HeadDbError
from spark_slurm.ledger.records import Record

if TYPE_CHECKING:
    pass

MAGIC = "spark-head"
SCHEMA_VERSION = 2


def body_of(rec: Record) -> dict[str, Any]:
    """The PER body inside a record's stored envelope, or {} when the bytes do not
    parse: a damaged record is still shown, and fails verification, never crashes."""
    try:
        envelope = json.loads(rec.body_bytes)
    except (ValueError, UnicodeDecodeError):
        return {}
    body = envelope.get("body") if isinstance(envelope, dict) else None
    return body if isinstance(body, dict) else {}


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the head node holds of one node's chain: its head and Merkle compact
    range (`frontier`, one 32-byte hash per set bit of `count`, largest first), the
    signing keys it has followed (`signers`, raw Ed25519 keys, genesis first), and
    where retention cut it (`first_seq`, `anchor`: the hash of record first_seq-1)."""

    node_id: int
    name: str
    origin: str | None
    head_seq: int | None
    head_hash: str | None
    count: int
    frontier: bytes = b""
    signers: tuple[bytes, ...] = ()
    first_seq: int = 0
    anchor: bytes | None = None

    @property
    def next_seq(self) -> int:
        return 0 if self.head_seq is None else self.head_seq + 1

    def to_json(self) -> dict[str, Any]:
        return {"node": self.name, "origin": self.origin, "head_seq": self.head_seq,
                "head_hash": self.head_hash, "count": self.count,
                "first_seq": self.first_seq}


@dataclass(frozen=True, slots=True)
class PruneNote:
    """One `sparkctl prune` the store remembers (head_meta `prunes`), so an audit of
    a job it removed can say so and name the archive instead of "no records"."""

    before_ns: int
    archive: str | None

    def to_json(self) -> dict[str, Any]:
        return {"before_ns": self.before_ns, "archive": self.archive}


def prunes_text(notes: Sequence[PruneNote]) -> str:
    """head_meta's `prunes` value for these prunes (`parse_prunes` reads it)."""
    return json.dumps([n.to_json() for n in notes])


def parse_prunes(text: str | None) -> list[PruneNote]:
    """head_meta's `prunes` value; a value this release did not write reads as none."""
    try:
        items = json.loads(text) if text else []
        return [PruneNote(int(i["before_ns"]), None if i.get("archive") is None
                          else str(i["archive"])) for i in items]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    node: str
    size: int
    root: str
    text: str
    source: str


@dataclass(frozen=True, slots=True)
class Finding:
    """A fixed-code observation a merge made about one node (and seq, when known)."""

    code: str
    node: str
    seq: int | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "node": self.node, "seq": self.seq, "detail": self.detail}


@dataclass
class Advance:
    """Where one merge leaves a node: verified seqs `first..last` stored, the new head
    hash and compact range, the perfect subtrees completed (level, index, hash), and
    the signing keys followed."""

    first: int
    last: int
    head_hash: bytes
    frontier: bytes
    signers: tuple[bytes, ...]
    subtrees: list[tuple[int, int, bytes]] = field(default_factory=list)


class RowCheck(Protocol):
    """Checks one source row (seq order) and returns its Merkle leaf, or None from the
    first row that fails: the store stores the rows it got a leaf for, and no other."""

    def __call__(self, rec: Sequence[Any]) -> bytes | None:
        """`rec`: a RawRecord, or a plain tuple of the same nine columns."""
        ...

    def stop(self, code: str, seq: int, why: str) -> None:
        """Fail at this row for a reason found outside the check (its columns could
        not be read as text)."""
        ...

    def restart(self) -> None:
        """Forget every row seen: the store is feeding them again from the first."""
        ...


class ClusterReads(Protocol):
    """What audit, replay and the proofs read (a cluster store or one node ledger)."""

    @property
    def name(self) -> str:
        """How to name this source in messages (a path or a URL without password)."""
        ...

    def node(self, name: str) -> NodeState | None: ...

    def nodes(self) -> list[NodeState]: ...

    def job_records(self, job_id: str) -> list[Record]: ...

    def node_records(self, node: str, first_seq: int, last_seq: int,
                     kinds: Sequence[str]) -> list[Record]: ...

    def followups(self, node: str, seq: int) -> list[Record]: ...

    def record_before(self, node: str, seq: int, kind: str) -> Record | None: ...

    def records_until(self, node: str | None, time_ns: int,
                      kinds: Sequence[str]) -> Iterator[Record]: ...

    def records_of_kind(self, kinds: Sequence[str], node: str | None = None
                        ) -> Iterator[Record]: ...

    def findings(self, node: str | None = None) -> list[Finding]: ...

    def prunes(self) -> list[PruneNote]:
        """The prunes this store went through, oldest first."""
        ...

    def latest_checkpoint(self, node_id: int, max_size: int) -> StoredCheckpoint | None: ...

    def checkpoints(self, node_id: int) -> list[StoredCheckpoint]: ...

    def largest_checkpoint(self, node_id: int, source: str) -> StoredCheckpoint | None:
        """The node's largest checkpoint from one source ("ledger" or "witness")."""
        ...

    def checkpoints_at(self, node_id: int, size: int) -> list[StoredCheckpoint]: ...

    def record(self, node_id: int, seq: int) -> Record | None: ...

    def stored_hashes(self, node_id: int, first: int, last: int) -> dict[int, bytes]:
        """seq -> raw hash of the stored records of a node in [first, last]."""
        ...

    def leaves(self, node_id: int, first_seq: int, count: int) -> list[bytes]:
        """Merkle leaf hashes of `count` records of a node from `first_seq` on."""
        ...

    def subtree(self, node_id: int, level: int, index: int) -> bytes | None:
        """The stored hash of the perfect subtree over leaves [index * 2^level,
        (index + 1) * 2^level), when one is kept (level >= 8)."""
        ...

    def hash_at(self, node_id: int, seq: int) -> bytes | None:
        """The stored hash of one record."""
        ...

    def close(self) -> None: ...


class NodeWriter(Protocol):
    """One merge transaction on the cluster store, the source's file at hand."""

    def lock_node(self, name: str, origin: str | None) -> NodeState:
        """Create the node when new, lock it against other merges, return its state."""
        ...

    def append(self, state: NodeState, first: int, check: RowCheck) -> int:
        """Copy the source's rows with seq >= first, each through `check`, into the
        node's records until `check` refuses one; returns how many were stored."""
        ...

    def mark(self) -> None:
        """Remember this point of the transaction (before `append`)."""
        ...

    def undo(self) -> None:
        """Drop what was written since `mark` (rows a checkpoint then contradicted)."""
        ...

    def set_head(self, state: NodeState, step: Advance) -> None:
        """Move the node's head, compact range, keys and stored subtrees."""
        ...

    def keep_forks(self, node_id: int, rows: Sequence[Any], source: str) -> None:
        """Keep checked source rows (raw columns) as the other side of a fork."""
        ...

    def add_checkpoint(self, node_id: int, size: int, root: str, text: str,
                       source: str) -> None: ...

    def add_finding(self, finding: Finding, source: str, now_ns: int) -> bool: ...


class Maintenance(ClusterReads, Protocol):
    """Retention's view of the store, inside one transaction merges wait for."""

    def rows(self, node_id: int, first: int, last: int) -> Iterator[list[tuple[Any, ...]]]:
        """Stored rows first..last (seq, time_ns, kind, job_id, body, prev_hash, hash,
        mac, key_id, ref_seq, leaf), a page at a time."""
        ...

    def cut_points(self, before_ns: int) -> tuple[dict[int, int], list[str]]:
        """Per node id, the first seq to keep, and the partitions that go."""
        ...

    def set_cut(self, state: NodeState, first: int, anchor: bytes | None,
                leaves: Sequence[tuple[int, bytes]]) -> int:
        """Remove the node's records before `first` (the genesis stays), keep `leaves`
        and `anchor` (the hash of record first-1); returns the rows removed."""
        ...

    def drop(self, partitions: Sequence[str]) -> None: ...

    def note_prune(self, note: PruneNote) -> None:
        """Remember a prune (in the same transaction as its removals)."""
        ...


class ClusterStore(ClusterReads, Protocol):
    """A cluster store: the reads, plus merge transactions, retention and backup."""

    url: str

    def writer(self, source: Path | None, *, node: str | None = None, after: int = -1
               ) -> AbstractContextManager[NodeWriter]:
        """One write transaction (committed on success); `source` is the node ledger
        or segment `append` reads rows from, for `node`, whose rows past `after` (the
        head as last seen: a hint, never trusted) are what may be added."""
        ...

    def bulk(self) -> AbstractContextManager[None]:
        """Around a whole merge run: lets the store defer work to its end."""
        ...

    def import_checkpoint(self, node: str, origin: str, size: int, root: str, text: str, *,
                          source: str) -> None:
        """Record a checkpoint outside a merge (the witness's cosigned ones)."""
        ...

    def maintenance(self) -> AbstractContextManager[Maintenance]:
        """Retention's transaction (merges wait until it ends)."""
        ...


def parse_url(url: str | Path) -> tuple[str, str]:
    """(scheme, target) of a `--db` value: `sqlite:///abs/path`, `sqlite:rel/path`,
    `postgresql://...` (or `postgres://`), or a bare path, which is SQLite."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql", text
    if text.startswith("sqlite:"):
        rest = text[len("sqlite:"):]
        if rest.startswith("//"):
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise HeadDbError(f"{text}: a sqlite URL names a local file "
                                  "(sqlite:///absolute/path or sqlite:relative/path)")
            rest = unquote(parts.path)
        if not rest:
            raise HeadDbError(f"{text}: no file named in the sqlite URL")
        return "sqlite", rest
    if "://" in text:
        raise HeadDbError(f"{text}: unknown database URL (use sqlite:///PATH, "
                          "postgresql://... or a file path)")
    return "sqlite", text


def display_url(url: str) -> str:
    """A URL with any password replaced, for messages and JSON output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def is_cluster_store(url: str | Path) -> bool:
    """True when `url` names a cluster store (any PostgreSQL URL, or an SQLite file
    holding the head node's tables); False for anything else, e.g. a node ledger."""
    scheme, target = parse_url(url)
    if scheme == "postgresql":
        return True
    from spark_slurm.head.sqlite_store import is_sqlite_store  # noqa: PLC0415

    return is_sqlite_store(Path(target))


def open_store(url: str | Path, *, create: bool = False) -> ClusterStore:
    """Open (or, with create, initialise) the cluster store a `--db` value names."""
    scheme, target = parse_url(url)
    if scheme == "postgresql":
        from spark_slurm.head.pg_store import PgStore  # noqa: PLC0415 (psycopg is optional)

        return PgStore.open(target, create=create)
    from spark_slurm.head.sqlite_store import SqliteStore  # noqa: PLC0415

    return SqliteStore.open(Path(target), create=create)
