"""A node ledger's retention cut: what stays provable once old records are pruned.

`sparkctl ledger prune` (ledger/prune.py) removes the records before a cut seq A
(a multiple of CUT_ALIGN) after archiving them, except those the node and its
verifier still need. Three things keep everything that stays verifiable without
the records removed:

- the `tree` table keeps every stored subtree, so the Merkle tree of the first A
  records is its compact range at A, made of stored subtrees; the verifier checks
  every stored subtree below A against its children, top down, and continues the
  tree from that compact range, so every signed checkpoint at A or later proves it;
- record A's stored prev hash is the chain's anchor: the links from A to a
  checkpoint's head, or record A's MAC, prove it;
- each record kept below A (KEPT_KINDS, the newest of each ingest source and, per
  GPU, the newest that set its limit)
  carries, in the meta row `cut`, its RFC 6962 inclusion proof at the tree size of
  the cut that kept it (itself a cut: a compact range of stored subtrees).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from spark_slurm.errors import LedgerError
from spark_slurm.ledger.chain import SUBTREE_LEVEL, fold, node_hash

CUT_ALIGN = 1 << 14
"""A cut falls on a multiple of this many records: the parallel verifier's chunk
size (verify_par.CHUNK_BITS), so a pruned ledger still verifies on every core, and a
multiple of the stored subtrees' 2^SUBTREE_LEVEL leaves, so the compact range at a
cut is stored subtrees only. About a week of records on a busy node."""
MIN_ALIGN = 1 << SUBTREE_LEVEL
KEPT_KINDS = ("genesis", "key", "policy", "reconcile")
"""Kept below a cut: who the node is and its keys (signing-key rotations, HMAC
epoch seals: the verifier follows them), and what sparkd looks up at start-up."""
NO_ARCHIVE = "its archive (not recorded)"
"""How a message names the archive of a cut that lists none."""


@dataclass(frozen=True)
class Cut:
    """The meta row `cut`: records before `seq` are pruned; `kept` maps each record
    still held below it to (tree size of its proof, audit path)."""

    seq: int
    time_ns: int
    archives: tuple[str, ...] = ()
    kept: dict[int, tuple[int, list[bytes]]] = field(default_factory=dict)

    @property
    def archive_list(self) -> str:
        """The archives, as every message that sends a reader to them names them."""
        return ", ".join(self.archives) or NO_ARCHIVE

    def to_text(self) -> str:
        return json.dumps({"seq": self.seq, "time_ns": self.time_ns,
                           "archives": list(self.archives),
                           "kept": {str(s): {"size": size, "proof": [h.hex() for h in proof]}
                                    for s, (size, proof) in sorted(self.kept.items())}},
                          sort_keys=True, separators=(",", ":"))


def parse_cut(text: str, where: str) -> Cut:
    """The meta row's JSON, or a LedgerError naming what is malformed."""
    try:
        raw = json.loads(text)
        seq, time_ns = raw["seq"], raw["time_ns"]
        archives = tuple(str(a) for a in raw.get("archives", []))
        kept: dict[int, tuple[int, list[bytes]]] = {}
        for s, entry in raw["kept"].items():
            proof = [bytes.fromhex(h) for h in entry["proof"]]
            if any(len(h) != 32 for h in proof) or type(entry["size"]) is not int:
                raise ValueError("a proof hash is not 32 bytes")
            kept[int(s)] = (entry["size"], proof)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{where}: the ledger's cut (meta row 'cut') is malformed: "
                          f"{exc}") from None
    if type(seq) is not int or type(time_ns) is not int or seq <= 0 or seq % MIN_ALIGN:
        raise LedgerError(f"{where}: the ledger's cut (meta row 'cut') names no valid seq")
    return Cut(seq, time_ns, archives, kept)


def cut_of(meta: dict[str, str], where: str) -> Cut | None:
    """The ledger's cut, or None for a ledger that holds every record."""
    text = meta.get("cut")
    return None if text is None else parse_cut(text, where)


class CutProblem(Exception):
    """What is wrong below the cut: the first bad seq (or None) and why."""

    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


def _stored(conn: sqlite3.Connection, level: int, idx: int) -> bytes | None:
    row = conn.execute("SELECT CAST(hash AS BLOB) FROM tree WHERE level = ? AND idx = ?",
                       (level, idx)).fetchone()
    return row[0] if row is not None and isinstance(row[0], bytes) and len(row[0]) == 32 \
        else None


def compact_range(conn: sqlite3.Connection, size: int) -> list[tuple[int, int, bytes]]:
    """(level, index, hash) of the perfect subtrees covering [0, size), largest
    first, read from the tree table (size a multiple of 2^SUBTREE_LEVEL)."""
    out, lo = [], 0
    for level in range(size.bit_length() - 1, SUBTREE_LEVEL - 1, -1):
        if size >> level & 1:
            h = _stored(conn, level, lo >> level)
            if h is None:
                raise CutProblem(None, f"the stored subtree ({level}, {lo >> level}) under the "
                                 f"cut at seq {size} is missing")
            out.append((level, lo >> level, h))
            lo += 1 << level
    return out


def check_subtrees(conn: sqlite3.Connection, cut: int) -> tuple[list[bytes], int, list[
        tuple[int, int, bytes]]]:
    """Every stored subtree wholly below the cut, checked top down from the compact
    range at the cut (each parent the hash of its two stored children): returns the
    compact range's hashes, how many subtrees there are and all of them (for the
    verifier's multiset check of the tree table)."""
    top = compact_range(conn, cut)
    seen: list[tuple[int, int, bytes]] = []
    todo = list(top)
    while todo:
        level, idx, h = todo.pop()
        seen.append((level, idx, h))
        if level == SUBTREE_LEVEL:
            continue
        left, right = _stored(conn, level - 1, 2 * idx), _stored(conn, level - 1, 2 * idx + 1)
        if left is None or right is None or node_hash(left, right) != h:
            raise CutProblem(None, f"the stored subtree ({level}, {idx}) under the cut at "
                             f"seq {cut} is not the hash of its two halves")
        todo += [(level - 1, 2 * idx, left), (level - 1, 2 * idx + 1, right)]
    rows = conn.execute("SELECT count(*) FROM tree WHERE (idx + 1) << level <= ?",
                        (cut,)).fetchone()[0]
    if rows != len(seen):
        raise CutProblem(None, f"the tree table holds {rows} subtrees under the cut at seq "
                         f"{cut}, the records' tree has {len(seen)}")
    return [h for _, _, h in top], len(seen), seen


def root_at(conn: sqlite3.Connection, size: int) -> bytes:
    """Merkle root of the first `size` records, from the stored compact range."""
    return fold([h for _, _, h in compact_range(conn, size)])


def kept_rows(conn: sqlite3.Connection, cut: Cut) -> list[Any]:
    """The rows held below the cut, in seq order; each must be one the cut lists."""
    rows = conn.execute("SELECT seq FROM per WHERE seq < ? ORDER BY seq", (cut.seq,)).fetchall()
    held = [int(r[0]) for r in rows]
    listed = sorted(cut.kept)
    if listed and listed[-1] >= cut.seq:
        raise CutProblem(listed[-1], f"the cut at seq {cut.seq} lists a proof for record "
                         f"{listed[-1]}, which is not below it")
    if held != listed:
        extra = sorted(set(held) - set(listed))
        if extra:
            raise CutProblem(extra[0], f"record {extra[0]} is below the cut at seq {cut.seq} "
                             "but the cut lists no proof for it")
        gone = sorted(set(listed) - set(held))[0]
        raise CutProblem(gone, f"record {gone}, kept at the cut at seq {cut.seq}, is missing")
    return held

