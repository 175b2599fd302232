"""The per-node ledger: durable, hash-chained, Merkle-indexed appends to SQLite.

One writer (the daemon's writer thread), any number of readers; a lock guards
the single connection so reader threads may call `records()` too. Every append
commits with synchronous=FULL in WAL mode, so a returned Receipt survives a
crash. The Merkle frontier and the current HMAC epoch key live in the `state`
table and change in the same transaction as the records they follow.
"""

from __future__ import annotations

import base64
import os
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import InputError, LedgerError, LedgerKeyError
from spark_slurm.ledger import hmac_epochs
from spark_slurm.ledger.batch import Row as _Row
from spark_slurm.ledger.batch import chain_rows
from spark_slurm.ledger.chain import Chain
from spark_slurm.ledger.checkpoint import (
    Checkpoint,
    origin_for,
    parse_checkpoint,
    sign_checkpoint,
)
from spark_slurm.ledger.keys import hmac_key_id, public_b64, public_raw, signing_key_id
from spark_slurm.ledger.merkle import leaf_hash
from spark_slurm.ledger.query import Reads
from spark_slurm.ledger.records import Receipt, Record, envelope_bytes
from spark_slurm.ledger.schema import (
    DDL,
    FORMAT,
    INSERT_PER,
    INSERT_TREE,
    SCHEMA_VERSION,
    check_file,
    connect,
    read_meta,
    statements,
)
from spark_slurm.ledger.tree import ledger_tree
from spark_slurm.ledger.upgrade import upgrade

ROTATE_LABEL = b"spark-ledger rotate\n"


def rotation_message(origin: str, new_public_raw: bytes) -> bytes:
    """What the outgoing key signs to endorse its successor."""
    return ROTATE_LABEL + origin.encode() + b"\n" + new_public_raw


def _check_owner(path: Path, meta: Mapping[str, str], node: str | None, cluster: str) -> None:
    """An existing ledger must be this node's and this cluster's (checked before
    anything, the schema upgrade included, writes to it)."""
    if node is not None and node != meta["node"]:
        raise LedgerError(f"{path}: ledger belongs to node {meta['node']!r}, not {node!r}")
    if cluster != meta["cluster"]:
        raise LedgerError(f"{path}: ledger belongs to cluster {meta['cluster']!r}, "
                          f"not {cluster!r}")


class Ledger:
    """A node's Power Event Record ledger. Use `Ledger.open`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, meta: Mapping[str, str],
                 clock: Clock, checkpoint_interval_s: float) -> None:
        self._conn = conn
        self.path = path
        self.node = meta["node"]
        self.cluster = meta["cluster"]
        self.origin = origin_for(self.cluster, self.node)
        self._clock = clock
        self._interval_ns = int(checkpoint_interval_s * 1e9)
        self._lock = threading.Lock()
        self._closed = False
        self._signing: Ed25519PrivateKey | None = None
        self._hmac_id: str | None = meta.get("hmac_key_id") or None
        self._origin_ns = int(meta["created_ns"])
        self._epoch_ns = int(meta["epoch_seconds"]) * 1_000_000_000
        self._epoch = 0
        self._key: bytes | None = None
        self._chain = Chain()  # head and Merkle compact range after the last record
        self._latest: dict[str, int] = {}  # ingest source -> seq, in the write at hand
        self._reads = Reads(self._fetch, SCHEMA_VERSION)
        self._last_cp_size = 0
        self._last_cp_ns = 0

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], hmac_key: bytes | None = None,
             signing_key: Ed25519PrivateKey | None = None, *, node: str | None = None,
             cluster: str = "spark", clock: Clock = SYSTEM_CLOCK,
             checkpoint_interval_s: float = 900, epoch_seconds: int = 3600) -> Ledger:
        """Open (creating with a genesis record if new) the ledger at `path`.

        `hmac_key` is K[0]: needed only when creating; on reopen the evolved
        epoch key is read from the ledger and a given K[0] must match its id.
        """
        p = Path(path)
        if hmac_key is not None and len(hmac_key) != 32:
            raise LedgerKeyError(f"HMAC key must be 32 bytes, got {len(hmac_key)}")
        if epoch_seconds < 1:
            raise InputError(f"epoch_seconds must be positive, got {epoch_seconds}")
        exists = check_file(p, allow_empty=True)
        conn = connect(p, readonly=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
            if not exists:
                meta = cls._create(conn, hmac_key, signing_key=signing_key,
                                   node=node or socket.gethostname().split(".")[0],
                                   cluster=cluster, clock=clock, epoch_seconds=epoch_seconds)
            else:
                meta = read_meta(conn, p)
                _check_owner(p, meta, node, cluster)
                meta = upgrade(conn, p, meta)
            led = cls(conn, p, meta, clock, checkpoint_interval_s)
            led._load(hmac_key, signing_key)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise LedgerError(f"{p}: cannot use ledger: {exc}") from None
        except BaseException:
            conn.close()
            raise
        led.maintain()
        return led

    @staticmethod
    def _create(conn: sqlite3.Connection, hmac_key: bytes | None, *,
                signing_key: Ed25519PrivateKey | None, node: str, cluster: str,
                clock: Clock, epoch_seconds: int) -> dict[str, str]:
        origin_for(cluster, node)  # validates the names early
        now = clock.now_ns()
        hid = hmac_key_id(hmac_key) if hmac_key is not None else None
        pub = signing_key.public_key() if signing_key is not None else None
        body: dict[str, Any] = {
            "v": 1, "node": node, "cluster": cluster, "created_ns": now,
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "epoch_seconds": epoch_seconds,
            "hmac_key_id": hid,
            "signing_key_id": signing_key_id(pub) if pub is not None else None,
            "signing_public_key": public_b64(pub) if pub is not None else None,
        }
        stored = envelope_bytes(0, now, "genesis", body)
        chain = Chain()
        (h,) = chain.link([stored])
        mac = hmac_epochs.mac(hmac_key, h) if hmac_key is not None else None
        kid = hmac_epochs.key_id(hid, 0) if hid is not None else None
        meta = {"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "node": node,
                "cluster": cluster, "created_ns": str(now), "epoch_seconds": str(epoch_seconds),
                "hmac_key_id": hid or ""}
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(DDL):
                conn.execute(statement)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
            conn.execute(INSERT_PER, (0, now, "genesis", None, stored, bytes(32), h, mac, kid))
            state = [("frontier", chain.to_bytes())]
            if hmac_key is not None:
                state += [("hmac_key", hmac_key), ("hmac_epoch", b"0")]
            conn.executemany("INSERT INTO state VALUES (?, ?)", state)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return meta

    def _load(self, hmac_key: bytes | None, signing_key: Ed25519PrivateKey | None) -> None:
        where = str(self.path)
        last = self._conn.execute(
            "SELECT seq, hash FROM per ORDER BY seq DESC LIMIT 1").fetchone()
        state = dict(self._conn.execute("SELECT key, value FROM state").fetchall())
        if last is None or "frontier" not in state:
            raise LedgerError(f"{where}: ledger has no genesis record or no tree state")
        try:
            self._chain = Chain.from_bytes(int(last[0]) + 1, bytes(state["frontier"]),
                                           bytes(last[1]))
        except ValueError as exc:
            raise LedgerError(f"{where}: saved Merkle frontier is damaged: {exc}") from None
        if self._hmac_id is not None:
            if hmac_key is not None and hmac_key_id(hmac_key) != self._hmac_id:
                raise LedgerKeyError(f"{where}: HMAC key {hmac_key_id(hmac_key)} is not this "
                                     f"ledger's key {self._hmac_id}")
            self._key = bytes(state["hmac_key"])
            self._epoch = int(bytes(state["hmac_epoch"]))
        elif hmac_key is not None:
            raise LedgerKeyError(f"{where}: ledger was created without HMAC; no key may be given")
        current = self._current_signing_id()
        if signing_key is not None:
            given = signing_key_id(signing_key.public_key())
            if given != current:
                raise LedgerKeyError(f"{where}: signing key {given} is not the ledger's current "
                                     f"key {current or '(none)'}")
            self._signing = signing_key
        cp = self._conn.execute(
            "SELECT size, time_ns FROM checkpoint ORDER BY id DESC LIMIT 1").fetchone()
        if cp is not None:
            self._last_cp_size, self._last_cp_ns = int(cp[0]), int(cp[1])

    def _current_signing_id(self) -> str | None:
        """Key id named by the latest rotation record, else by the genesis record:
        read newest first through the kind index, skipping epoch seals unparsed."""
        for record in self._reads.newest_first(["genesis", "key"]):
            if record.kind == "genesis":
                found = record.body.get("signing_key_id")
            elif b'"event":"rotate"' in record.body_bytes and \
                    record.body.get("event") == "rotate":
                found = record.body.get("key_id")
            else:
                continue
            return found if isinstance(found, str) else None
        return None

    # -- writing -------------------------------------------------------------

    def append(self, kind: str, body: Mapping[str, Any]) -> Receipt:
        """Append one PER; durable (fsync) when this returns."""
        return self.append_many([(kind, body)])[0]

    def append_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Receipt]:
        """Append several PERs in one transaction with one fsync."""
        batch = list(items)
        with self._lock:
            self._check_open()
            receipts = self._write(batch, self._clock.now_ns())
            return receipts[len(receipts) - len(batch):]

    def _write(self, batch: Sequence[tuple[str, Mapping[str, Any]]], now: int) -> list[Receipt]:
        saved = (self._chain.copy(), self._epoch, self._key)
        rows: list[_Row] = []
        self._chain.subtrees = []
        self._latest = {}
        try:
            epoch_before = self._epoch
            self._seal_elapsed(now, rows)
            self._make_rows(batch, now, rows)
            self._commit(rows, self._chain.subtrees)
        except BaseException:
            (self._chain, self._epoch, self._key) = saved
            raise
        finally:
            self._chain.subtrees = None
        if self._epoch != epoch_before:
            # The old epoch key's bytes may still sit in WAL frames: flush and truncate.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return [Receipt(r[0], r[6].hex()) for r in rows]

    def _make_rows(self, batch: Sequence[tuple[str, Mapping[str, Any]]], now: int,
                   rows: list[_Row]) -> None:
        key = self._key if self._hmac_id is not None else None
        kid = hmac_epochs.key_id(self._hmac_id, self._epoch) \
            if key is not None and self._hmac_id is not None else None
        chain_rows(batch, rows, now=now, chain=self._chain, key=key, key_id=kid,
                   latest=self._latest)

    def _seal_elapsed(self, now: int, rows: list[_Row]) -> None:
        """Seal every epoch that has ended, then move to the current epoch's key."""
        if self._key is None:
            return
        target = hmac_epochs.epoch_of(now, self._origin_ns, self._epoch_ns)
        while self._epoch < target:
            self._make_rows([("key", {
                "v": 1, "node": self.node, "event": "seal", "key_id": self._hmac_id,
                "epoch": self._epoch})], now, rows)
            self._key = hmac_epochs.next_key(self._key)
            self._epoch += 1

    def _commit(self, rows: Sequence[_Row], subtrees: Sequence[tuple[int, int, bytes]] | None
                ) -> None:
        if not rows:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(INSERT_PER, rows)
            if subtrees:
                conn.executemany(INSERT_TREE, subtrees)
            if self._latest:
                conn.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", [
                    (f"latest.{src}", str(seq).encode()) for src, seq in self._latest.items()])
            conn.execute("UPDATE state SET value = ? WHERE key = 'frontier'",
                         (self._chain.to_bytes(),))
            if self._key is not None:
                conn.executemany("UPDATE state SET value = ? WHERE key = ?", [
                    (self._key, "hmac_key"), (str(self._epoch).encode(), "hmac_epoch")])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def maintain(self) -> list[Receipt]:
        """Periodic duty (the daemon calls it every few seconds): seal elapsed HMAC
        epochs even when idle, and write a checkpoint once the interval has passed."""
        with self._lock:
            self._check_open()
            now = self._clock.now_ns()
            receipts = self._write([], now)  # seals only
            if (self._signing is not None and self._chain.size > self._last_cp_size
                    and now - self._last_cp_ns >= self._interval_ns):
                self._checkpoint(now)
            return receipts

    def checkpoint(self) -> Checkpoint:
        """Sign and keep a checkpoint of the ledger as it stands now."""
        with self._lock:
            self._check_open()
            return self._checkpoint(self._clock.now_ns())

    def _checkpoint(self, now: int) -> Checkpoint:
        if self._signing is None:
            raise LedgerKeyError(f"{self.path}: opened without a signing key; "
                                 "cannot sign a checkpoint")
        cp = sign_checkpoint(self.origin, self._chain.size, self._chain.root(),
                             self._chain.head.hex(), self._signing)
        kid = signing_key_id(self._signing.public_key())
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute("INSERT INTO checkpoint (size, time_ns, key_id, text) "
                               "VALUES (?, ?, ?, ?)", (cp.size, now, kid, cp.text))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._last_cp_size, self._last_cp_ns = cp.size, now
        return cp

    def rotate_signing_key(self, new_key: Ed25519PrivateKey) -> Receipt:
        """Record a `key` PER endorsing `new_key` (signed by the current key), then use it."""
        with self._lock:
            self._check_open()
            if self._signing is None:
                raise LedgerKeyError(f"{self.path}: rotation needs the current signing key")
            new_pub = public_raw(new_key.public_key())
            body = {"v": 1, "node": self.node, "event": "rotate",
                    "key_id": signing_key_id(new_pub),
                    "prev_key_id": signing_key_id(self._signing.public_key()),
                    "public_key": base64.b64encode(new_pub).decode(),
                    "endorsement": base64.b64encode(
                        self._signing.sign(rotation_message(self.origin, new_pub))).decode()}
            receipt = self._write([("key", body)], self._clock.now_ns())[-1]
            self._signing = new_key
            return receipt

    # -- reading -------------------------------------------------------------

    def head(self) -> Receipt | None:
        """Sequence number and hash of the newest record."""
        with self._lock:
            if self._chain.size == 0:
                return None
            return Receipt(self._chain.size - 1, self._chain.head.hex())

    @property
    def size(self) -> int:
        """Number of records, genesis included (= Merkle tree size)."""
        return self._chain.size

    @property
    def hmac_key_id(self) -> str | None:
        """Id of the ledger's HMAC key K[0] (None: created without HMAC)."""
        return self._hmac_id

    @property
    def signing_key_id(self) -> str | None:
        """Id of the key checkpoints are signed with now (None without one)."""
        return None if self._signing is None else signing_key_id(self._signing.public_key())

    def records(self, job_id: str | None = None, since: int | None = None,
                kinds: Iterable[str] | None = None) -> Iterator[Record]:
        """Records in seq order; `since` is inclusive. Reads in pages, never holding
        the lock between them, so a slow consumer does not block the writer."""
        return self._reads.records(job_id, since, kinds)

    def records_newest_first(self, kinds: Iterable[str] | None = None) -> Iterator[Record]:
        """Records from the head backwards, for readers that stop at the latest few
        (sparkd's start-up needs each GPU's last limit, not a year of history)."""
        return self._reads.newest_first(kinds)

    def latest_ingested(self, source: str) -> Record | None:
        """The newest record whose body's `source` is `source` ("journal" or "spool"),
        found through `state` (the ingest cursors never search the ledger for it)."""
        return self._reads.latest_ingested(source)

    def _fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """One page of a query, under the lock (see `query.Reads`)."""
        with self._lock:
            self._check_open()
            return self._conn.execute(sql, args).fetchall()

    def checkpoints(self) -> list[Checkpoint]:
        """Checkpoints kept in this ledger, oldest first."""
        with self._lock:
            self._check_open()
            texts = self._conn.execute("SELECT text FROM checkpoint ORDER BY id").fetchall()
        return [parse_checkpoint(str(t)) for (t,) in texts]

    def leaf_hashes(self, size: int | None = None) -> list[bytes]:
        """Merkle leaf hashes of the first `size` records (reads them all)."""
        n = self._chain.size if size is None else size
        with self._lock:
            self._check_open()
            rows = self._conn.execute("SELECT body FROM per WHERE seq < ? ORDER BY seq",
                                      (n,)).fetchall()
        return [leaf_hash(bytes(b)) for (b,) in rows]

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """Audit path of record `seq` in the tree of the first `size` records (now by
        default), from the stored subtrees: O(log n) reads, not the whole ledger."""
        with self._lock:
            self._check_open()
            return ledger_tree(self._conn, self._chain.size if size is None else size
                               ).inclusion_proof(seq)

    # -- closing -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError(f"{self.path}: ledger is closed")

    def close(self) -> None:
        """Write a shutdown checkpoint (when there is a signing key) and close."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._signing is not None and self._chain.size > self._last_cp_size:
                    self._checkpoint(self._clock.now_ns())
            finally:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
