"""A node ledger as merge reads it: a private copy, its rows, and storing those rows.

Merge verifies a node ledger and then copies the records that passed. Reading the
source twice (once to check, once to copy) would let a file swapped in between be
copied unchecked, so merge first copies the source into a directory only the
merging user can write, and both the check and the copy read that copy. The copy
of the rows is then one `INSERT ... SELECT` inside SQLite instead of a Python
row-by-row bind (which cost more than the checks): the Merkle leaf of each row
comes from the verifier through a SQL function, and `ref_seq` from the same
function the row-by-row path uses, so both paths store the same bytes.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from spark_slurm.errors import LedgerError
from spark_slurm.head.headdb import HeadDb
from spark_slurm.head.scan import RawRecord, ref_seq_of
from spark_slurm.ledger.schema import open_existing

_ROWS = (
    "INSERT INTO records(node_id, seq, time_ns, kind, job_id, body, prev_hash, hash, mac,"
    " key_id, ref_seq, leaf) SELECT ?1, seq, time_ns, kind, job_id, CAST(body AS BLOB),"
    " CAST(prev_hash AS BLOB), CAST(hash AS BLOB), CAST(mac AS BLOB), key_id,"
    " CASE WHEN instr(CAST(body AS BLOB), X'22726566223a') > 0"  # REF_TAG, '"ref":'
    " THEN spark_ref_seq(CAST(body AS BLOB)) END, spark_leaf(seq)"
    " FROM src.per WHERE seq BETWEEN ?2 AND ?3 ORDER BY seq")
_FORKS = (
    "INSERT OR IGNORE INTO forks(node_id, seq, time_ns, kind, body, prev_hash, hash, mac,"
    " key_id, source) SELECT ?1, seq, time_ns, kind, CAST(body AS BLOB),"
    " CAST(prev_hash AS BLOB), CAST(hash AS BLOB), CAST(mac AS BLOB), key_id, ?4"
    " FROM src.per WHERE seq BETWEEN ?2 AND ?3 ORDER BY seq")


def read_node_ledger(path: Path) -> tuple[list[RawRecord], list[str]]:
    """Every row and checkpoint text of a node ledger, read-only, in seq order."""
    records, cps, _exact = read_rows(path, path)
    return records, cps


def read_rows(path: Path, shown: Path) -> tuple[list[RawRecord], list[str], bool]:
    """`read_node_ledger`, naming `shown` in errors, plus whether every text column
    read as stored (no U+FFFD stand-ins for invalid UTF-8), so that rows can be copied
    by SQL rather than from these objects."""
    conn, _meta = open_existing(path)
    lenient = conn.text_factory
    exact = True
    try:
        # strict UTF-8 is sqlite3's C decoder; a damaged text column makes it raise, and
        # then the rows are read again through the ledger's lenient (U+FFFD) decoder
        conn.text_factory = str
        try:
            rows = conn.execute(_SELECT_ROWS).fetchall()
        except sqlite3.OperationalError:
            conn.text_factory = lenient
            exact = False
            rows = conn.execute(_SELECT_ROWS).fetchall()
        cps = [r[0] for r in conn.execute("SELECT text FROM checkpoint ORDER BY id")]
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{shown}: unreadable ledger: {exc}") from None
    finally:
        conn.close()
    out = list(map(RawRecord._make, rows))
    return out, cps, exact


# as the verifier reads them: a BLOB column rewritten as TEXT (or a number) is judged
# by its bytes, never by a decoding of them
_SELECT_ROWS = ("SELECT seq, time_ns, kind, job_id, CAST(body AS BLOB), CAST(prev_hash AS BLOB),"
                " CAST(hash AS BLOB), CAST(mac AS BLOB), key_id FROM per ORDER BY seq")


def private_copy(path: Path, workdir: Path) -> Path:
    """Copy a node ledger into `workdir` after checking it is one (same errors as reading
    it directly). A source with unmerged WAL frames goes through SQLite's online backup,
    which sees them; a plain file is copied as bytes."""
    conn, _meta = open_existing(path)
    try:
        fd, name = tempfile.mkstemp(prefix="node-", suffix=".db", dir=workdir)  # 0600
        os.close(fd)
        dest = Path(name)
        wal = Path(f"{path}-wal")
        try:
            if wal.exists() and wal.stat().st_size > 0:
                with closing(sqlite3.connect(dest)) as out:
                    conn.backup(out)
            else:
                shutil.copyfile(path, dest)
        except (OSError, sqlite3.DatabaseError) as exc:
            dest.unlink(missing_ok=True)
            raise LedgerError(f"{path}: cannot copy the ledger: {exc}") from None
    finally:
        conn.close()
    return dest


@contextmanager
def attached(db: HeadDb, copy: Path) -> Iterator[None]:
    """The copy attached to the cluster ledger's connection as `src` (outside any
    transaction, as SQLite requires)."""
    db.conn.execute("ATTACH DATABASE ? AS src", (str(copy),))
    try:
        yield
    finally:
        db.conn.execute("DETACH DATABASE src")


def copy_rows(db: HeadDb, node_id: int, first: int, last: int, *, leaves: Sequence[bytes],
              head_hash: str) -> int:
    """Copy seqs first..last of the attached copy (already verified, with `leaves[seq]`
    their Merkle leaves) under `node_id`, and move the node's head; returns the count."""
    db.conn.create_function("spark_leaf", 1, leaves.__getitem__, deterministic=True)
    db.conn.create_function("spark_ref_seq", 1, ref_seq_of, deterministic=True)
    count = db.conn.execute(_ROWS, (node_id, first, last)).rowcount
    if count != last - first + 1:  # the copy is private: this is a bug, never input
        raise LedgerError(f"copied {count} rows for seqs {first}..{last} of the checked copy")
    db.conn.execute("UPDATE nodes SET head_seq=?, head_hash=?, count=count+? WHERE node_id=?",
                    (last, head_hash, count, node_id))
    return count


def copy_forks(db: HeadDb, node_id: int, first: int, last: int, source: str) -> None:
    """Keep seqs first..last of the attached copy as fork evidence."""
    db.conn.execute(_FORKS, (node_id, first, last, source))
