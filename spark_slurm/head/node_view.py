"""One node ledger, read as audit and replay read the cluster store.

`sparkctl audit JOBID --db NODE.db` must not load the ledger: a node holding a
million records answers one job from its indexes. This view reads the `per`
table read-only through its seq key and `per_job` index (the job's records, the
records between its first and last, the follow-ups just after each action),
checks each record's hash and link to the one before, and proves it against the
newest checkpoint the ledger keeps that is signed by the node's key (the trust
store's with `--keys`, else the genesis one, following endorsed rotations).
Inclusion proofs use the perfect subtrees a schema-2 ledger keeps in its `tree`
table; on an older ledger the subtrees are hashed from the bodies, in bounded
memory (one block at a time).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from spark_slurm.errors import CheckpointError, CheckpointInvalid, LedgerError
from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.proofs import MerkleProver, Prover
from spark_slurm.head.scan import follow_rotation, identify
from spark_slurm.head.store import Finding, NodeState, PruneNote, StoredCheckpoint, body_of
from spark_slurm.ledger.chain import continues
from spark_slurm.ledger.checkpoint import Checkpoint, verify_checkpoint
from spark_slurm.ledger.cut import cut_of
from spark_slurm.ledger.merkle import leaf_hash
from spark_slurm.ledger.records import Record
from spark_slurm.ledger.schema import open_existing

NODE_ID = 1
FOLLOWUP_ROWS = 512  # follow-ups are looked for in pages of rows after the action...
FOLLOWUP_NS = 6 * 3600 * 1_000_000_000  # ...until records are this much newer than it
CHECKPOINT_TRIES = 64  # newest checkpoints tried for a valid signature
_COLS = ("seq, time_ns, kind, job_id, CAST(body AS BLOB), CAST(prev_hash AS BLOB),"
         " CAST(hash AS BLOB), CAST(mac AS BLOB), key_id")


class NodeLedgerView:
    """`ClusterReads` over one node ledger file, read-only, in one read snapshot."""

    def __init__(self, path: Path, keys: KeyRing | None = None) -> None:
        self.path = path
        self.conn, self.meta = open_existing(path)
        try:
            self.conn.execute("BEGIN")  # one snapshot for every read below
            last = self.conn.execute("SELECT seq, hash FROM per ORDER BY seq DESC LIMIT 1"
                                     ).fetchone()
            tables = {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise LedgerError(f"{path}: unreadable ledger: {exc}") from None
        self.node_name = self.meta.get("node", path.stem)
        self.origin = f"spark/{self.meta.get('cluster', 'spark')}/{self.node_name}"
        self.size = 0 if last is None else int(last[0]) + 1
        self.head = None if last is None else bytes(last[1])
        self.has_tree = "tree" in tables
        try:
            self.cut = cut_of(self.meta, str(path))
        except LedgerError:
            self.conn.close()
            raise
        """A pruned ledger's cut (its records before it are in archives)."""
        self.keys = keys
        self.problems: list[Finding] = []
        self._ranges: set[tuple[int, int]] = set()
        self.until: int | None = None
        """Replay reads only records before this seq (the first one verify rejects)."""
        self._checkpoint: StoredCheckpoint | bool | None = False
        self._keys: list[Any] | None = None
        self._rotated = False

    @property
    def name(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> NodeLedgerView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _rows(self, sql: str, args: Sequence[Any]) -> list[Record]:
        try:
            rows = self.conn.execute(f"SELECT {_COLS} FROM per {sql}",  # noqa: S608 (fixed SQL)
                                     tuple(args)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: unreadable ledger: {exc}") from None
        return [_record(row, self.node_name) for row in rows]

    # -- the node ------------------------------------------------------------
    def node(self, name: str) -> NodeState | None:
        if name != self.node_name:
            return None
        return NodeState(NODE_ID, self.node_name, self.origin, self.size - 1 if self.size else None,
                         self.head.hex() if self.head is not None else None, self.size)

    def nodes(self) -> list[NodeState]:
        state = self.node(self.node_name)
        return [state] if state is not None else []

    def identity_problem(self) -> Finding | None:
        """With a trust store: the genesis checked against it as merge would."""
        if self.keys is None:
            return None
        genesis = self._rows("WHERE seq = 0", ())
        body = body_of(genesis[0]) if genesis and genesis[0].kind == "genesis" else {}
        if not body:
            return Finding("GAP", self.node_name, 0, "ledger does not start with its genesis "
                           "record")
        _, finding, _ = identify(body, self.keys, None, self.path.stem)
        return finding

    def prunes(self) -> list[PruneNote]:
        """A node ledger's own cut is `cut` (`sparkctl ledger prune`), not a store prune."""
        return []

    def findings(self, node: str | None = None) -> list[Finding]:
        """What is wrong around what was read: a gap in a seq range the audit looked at
        (records deleted between a job's first and last), and a checkpoint the records
        contradict. A node ledger has no merge to record findings, so they are found
        here, within what was read."""
        for lo, hi in sorted(self._ranges):
            row = self.conn.execute(
                "SELECT p.seq + 1 FROM per p WHERE p.seq >= ? AND p.seq < ? AND NOT EXISTS"
                " (SELECT 1 FROM per q WHERE q.seq = p.seq + 1) ORDER BY p.seq LIMIT 1",
                (lo, hi)).fetchone()
            if row is not None:
                gone = int(row[0])
                after = self.conn.execute("SELECT min(seq) FROM per WHERE seq > ?",
                                          (gone,)).fetchone()
                end = int(after[0]) - 1 if after and after[0] is not None else gone
                self.problems.append(Finding("GAP", self.node_name, gone,
                                             f"seqs {gone}..{end} are missing"))
        self._ranges.clear()
        return [f for f in self.problems if node is None or f.node == node]

    # -- records ---------------------------------------------------------------
    def record(self, node_id: int, seq: int) -> Record | None:
        recs = self._rows("WHERE seq = ?", (seq,))
        return recs[0] if recs else None

    def hash_at(self, node_id: int, seq: int) -> bytes | None:
        row = self.conn.execute("SELECT CAST(hash AS BLOB) FROM per WHERE seq = ?",
                                (seq,)).fetchone()
        return None if row is None else bytes(row[0])

    def stored_hashes(self, node_id: int, first: int, last: int) -> dict[int, bytes]:
        return {int(s): bytes(h) for s, h in self.conn.execute(
            "SELECT seq, CAST(hash AS BLOB) FROM per WHERE seq BETWEEN ? AND ?", (first, last))}

    def job_records(self, job_id: str) -> list[Record]:
        return self._rows("WHERE job_id = ? ORDER BY seq", (job_id,))

    def node_records(self, node: str, first_seq: int, last_seq: int,
                     kinds: Sequence[str]) -> list[Record]:
        if node != self.node_name:
            return []
        marks = ",".join("?" * len(kinds))
        self._ranges.add((first_seq, last_seq))
        return self._rows(f"WHERE seq BETWEEN ? AND ? AND kind IN ({marks}) ORDER BY seq",
                          (first_seq, last_seq, *kinds))

    def followups(self, node: str, seq: int) -> list[Record]:
        """Records after `seq` whose `ref.seq` is `seq`, looked for in pages of rows
        until the records are FOLLOWUP_NS newer than the action (a follow-up is written
        seconds to minutes after it)."""
        action = self.record(NODE_ID, seq)
        if node != self.node_name or action is None:
            return []
        out: list[Record] = []
        at = seq + 1
        self._ranges.add((seq, min(seq + FOLLOWUP_ROWS, self.size - 1)))
        while at < self.size:
            page = self._rows("WHERE seq >= ? AND seq < ? AND instr(body, '\"ref\":') > 0"
                              " ORDER BY seq", (at, at + FOLLOWUP_ROWS))
            out.extend(r for r in page if _ref_seq(r) == seq)
            at += FOLLOWUP_ROWS
            row = self.conn.execute("SELECT time_ns FROM per WHERE seq = ?",
                                    (min(at, self.size) - 1,)).fetchone()
            if row is None or not isinstance(row[0], int) \
                    or row[0] > action.time_ns + FOLLOWUP_NS:
                break
        return out

    def record_before(self, node: str, seq: int, kind: str) -> Record | None:
        recs = self._rows("WHERE seq < ? AND kind = ? ORDER BY seq DESC LIMIT 1", (seq, kind))
        return recs[0] if recs and node == self.node_name else None

    def records_until(self, node: str | None, time_ns: int,
                      kinds: Sequence[str]) -> Iterator[Record]:
        if node not in (None, self.node_name):
            return iter(())
        marks = ",".join("?" * len(kinds))
        return self._paged(f"time_ns <= ? AND kind IN ({marks})", (time_ns, *kinds))

    def records_of_kind(self, kinds: Sequence[str], node: str | None = None
                        ) -> Iterator[Record]:
        if node not in (None, self.node_name):
            return iter(())
        marks = ",".join("?" * len(kinds))
        return self._paged(f"kind IN ({marks})", tuple(kinds))

    def _paged(self, where: str, args: tuple[Any, ...]) -> Iterator[Record]:
        at = 0
        until = self.until if self.until is not None else self.size
        while True:
            page = self._rows(f"WHERE seq >= ? AND seq < ? AND {where} ORDER BY seq LIMIT 1000",
                              (at, until, *args))
            yield from page
            if len(page) < 1000:
                return
            at = page[-1].seq + 1

    # -- proofs ---------------------------------------------------------------
    def latest_checkpoint(self, node_id: int, max_size: int) -> StoredCheckpoint | None:
        """The newest kept checkpoint, within the ledger, signed by the node's key."""
        if self._checkpoint is False:
            self._checkpoint = self._signed_checkpoint()
        cp = self._checkpoint
        return cp if isinstance(cp, StoredCheckpoint) and cp.size <= max_size else None

    def _signed_checkpoint(self) -> StoredCheckpoint | None:
        rows = self.conn.execute("SELECT text FROM checkpoint WHERE size <= ? ORDER BY id DESC"
                                 " LIMIT ?", (self.size, CHECKPOINT_TRIES)).fetchall()
        for (text,) in rows:
            cp = self.signed(str(text))
            if cp is None or cp.size > self.size or cp.size == 0:
                continue
            head = self.hash_at(NODE_ID, cp.size - 1)
            if head is None or head.hex() != cp.head_hash:
                self.problems.append(Finding("FORK", self.node_name, None, (
                    f"records differ from the ledger's own signed checkpoint of size "
                    f"{cp.size}")))
                return None
            return StoredCheckpoint(self.node_name, cp.size, cp.root.hex(), cp.text, "ledger")
        return None

    def checkpoint_after(self, seq: int) -> Checkpoint | None:
        """The smallest kept checkpoint covering `seq` that the node's key signed."""
        rows = self.conn.execute("SELECT text FROM checkpoint WHERE size > ? ORDER BY size"
                                 " LIMIT ?", (seq, CHECKPOINT_TRIES)).fetchall()
        for (text,) in rows:
            cp = self.signed(str(text))
            if cp is None:
                continue
            if cp.size > self.size:
                self.problems.append(Finding("ROLLBACK", self.node_name, self.size, (
                    f"ledger holds {self.size} records but its own checkpoint says "
                    f"{cp.size}")))
                return None
            return cp
        return None

    def signed(self, text: str) -> Checkpoint | None:
        """The checkpoint, when one of the node's keys signed it for its origin: the
        trust store's or genesis key first, then endorsed rotations (found by a scan
        of the ledger's key records, only when a checkpoint needs them)."""
        for rotations in (False, True):
            for key in self._signers(rotations):
                try:
                    return verify_checkpoint(text, key, self.origin)
                except (CheckpointInvalid, CheckpointError):
                    continue
        return None

    def _signers(self, rotations: bool) -> list[Any]:
        """The first key (rotations False) or the keys endorsed after it."""
        if self._keys is None:
            genesis = self._rows("WHERE seq = 0", ())
            body = body_of(genesis[0]) if genesis else {}
            ident, _, _ = identify(body, self.keys, None, self.path.stem)
            self._keys = list(ident.signers) if ident is not None else []
        if not rotations:
            return self._keys[:1]
        if not self._rotated and self._keys:
            self._rotated = True
            for rec in self._paged("kind = 'key' AND instr(body, '\"rotate\"') > 0", ()):
                b = body_of(rec)
                if b.get("event") == "rotate" and follow_rotation(b, self.origin, self._keys)[0]:
                    break
        return self._keys[1:]

    def chain_holds(self, seq: int, cp: Checkpoint) -> bool:
        """Records seq..cp.size-1 each continue the chain (the first from its own
        stored prev hash), and the last one's hash is the checkpoint's head."""
        head: bytes | None = None
        at = seq
        while at < cp.size:
            rows = self.conn.execute(
                "SELECT seq, NULL, NULL, NULL, CAST(body AS BLOB), CAST(prev_hash AS BLOB),"
                " CAST(hash AS BLOB) FROM per WHERE seq >= ? AND seq < ? ORDER BY seq"
                " LIMIT 4096", (at, cp.size)).fetchall()
            if not rows:
                return False
            for row in rows:
                if not continues(row, at, row[5] if head is None else head):
                    return False
                head, at = row[6], at + 1
        return head is not None and head.hex() == cp.head_hash

    def prover(self) -> Prover:
        """An RFC 6962 inclusion proof where the ledger keeps its subtrees (schema 2),
        else the record's hash chain to the next signed checkpoint."""
        return MerkleProver(self) if self.has_tree else ChainProver(self)

    def checkpoints(self, node_id: int) -> list[StoredCheckpoint]:
        cp = self.latest_checkpoint(node_id, self.size)
        return [cp] if cp is not None else []

    def largest_checkpoint(self, node_id: int, source: str) -> StoredCheckpoint | None:
        return self.latest_checkpoint(node_id, self.size) if source == "ledger" else None

    def checkpoints_at(self, node_id: int, size: int) -> list[StoredCheckpoint]:
        return [c for c in self.checkpoints(node_id) if c.size == size]

    def leaves(self, node_id: int, first_seq: int, count: int) -> list[bytes]:
        rows = self.conn.execute("SELECT CAST(body AS BLOB) FROM per WHERE seq >= ? AND seq < ?"
                                 " ORDER BY seq", (first_seq, first_seq + count))
        return [leaf_hash(bytes(r[0])) for r in rows]

    def subtree(self, node_id: int, level: int, index: int) -> bytes | None:
        if not self.has_tree:
            return None
        try:
            row = self.conn.execute("SELECT hash FROM tree WHERE level = ? AND idx = ?",
                                    (level, index)).fetchone()
        except sqlite3.DatabaseError:
            return None
        return None if row is None or not isinstance(row[0], bytes) else row[0]


def _record(row: Sequence[Any], node: str) -> Record:
    """A row as a Record, whatever an editor left in its columns: a column of the wrong
    type becomes a value that fails verification (the envelope no longer matches)
    instead of hiding the record."""
    seq, time_ns, kind, job_id, body, prev, value, mac, key_id = row
    return Record(int(seq), time_ns if isinstance(time_ns, int) else -1, str(kind),
                  job_id if job_id is None or isinstance(job_id, str) else str(job_id),
                  bytes(body or b""), bytes(prev or b"").hex(), bytes(value or b"").hex(),
                  None if mac is None else bytes(mac).hex(),
                  key_id if key_id is None or isinstance(key_id, str) else str(key_id), node)


def _ref_seq(rec: Record) -> int | None:
    ref = body_of(rec).get("ref")
    seq = ref.get("seq") if isinstance(ref, dict) else None
    return seq if isinstance(seq, int) else None


class ChainProver:
    """Proves a node-ledger record by its hash chain to the first checkpoint after it
    that the node's key signed: every record from it to the checkpoint's last one is
    re-hashed over its stored bytes and linked, and the last hash is the checkpoint's
    `head`. It rests on SHA-256 and the signature as an inclusion proof does, and
    costs the records between the two (a checkpoint interval, 15 minutes by default)
    instead of the stored subtrees a schema-1 ledger does not have."""

    def __init__(self, view: NodeLedgerView) -> None:
        self.view = view
        self.proven: list[tuple[int, int]] = []  # (first seq, checkpoint size) walked

    def prove(self, rec: Record) -> tuple[str, int | None]:
        for first, size in self.proven:
            if first <= rec.seq < size:
                return "ok", size
        cp = self.view.checkpoint_after(rec.seq)
        if cp is None:
            return "uncovered", None
        if not self.view.chain_holds(rec.seq, cp):
            return "failed", cp.size
        self.proven.append((rec.seq, cp.size))
        return "ok", cp.size
