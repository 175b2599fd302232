"""What merge reads of a source, and that what it stores is exactly what it checked.

The store reads the rows past the node's stored head once, handing each to merge's
check on its way in (an inline fast test, or every record through the full
checks). Whatever the damage, the fast path and the full checks leave
byte-identical stores with the same findings; the rows stored are the rows the
check saw, no more; and only the new rows are read.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from contextlib import closing
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.head.keyring import KeyRing
from spark_slurm.head.merge import merge_into, merge_ledgers
from spark_slurm.head.scan import RawRecord, ref_seq_of
from spark_slurm.head.store import open_store
from spark_slurm.ledger import Ledger, verify_ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key
from tests.unit.head import tamper
from tests.unit.head.builders import write_job
from tests.unit.head.conftest import Cluster
from tests.unit.head.stores import dump, query

pytestmark = pytest.mark.both_stores

DAMAGE = [
    "",
    "UPDATE per SET hash = randomblob(32) WHERE seq=4",
    "UPDATE per SET mac = randomblob(32) WHERE seq=5",
    "UPDATE per SET mac = NULL WHERE seq=5",
    "UPDATE per SET key_id = 'zz:0' WHERE seq=5",
    "UPDATE per SET time_ns = time_ns + 1 WHERE seq=6",
    "UPDATE per SET job_id = 'other' WHERE job_id IS NOT NULL AND seq > 2",
    "UPDATE per SET prev_hash = randomblob(32) WHERE seq=3",
    "DELETE FROM per WHERE seq=4",
    "UPDATE per SET kind = 'restore' WHERE seq=3",
    "UPDATE per SET body = CAST(body AS TEXT) WHERE seq=2",
    "UPDATE per SET kind = CAST(X'FF6361' AS TEXT) WHERE seq=3",
    "UPDATE per SET kind = CAST(kind AS BLOB) WHERE seq=3",
    "UPDATE per SET job_id = CAST(job_id AS BLOB) WHERE job_id IS NOT NULL",
    "UPDATE per SET key_id = CAST(key_id AS BLOB) WHERE seq=5",
    "UPDATE per SET time_ns = 'noon' WHERE seq=4",
    "UPDATE per SET seq = seq + 1000 WHERE seq >= 7",
    "INSERT INTO per SELECT (SELECT max(seq) + 1 FROM per), time_ns, kind, job_id, body,"
    " prev_hash, hash, mac, key_id FROM per WHERE seq = 3",
]


def _merged(c: Cluster, name: str, *, fast: bool) -> str:
    into = c.another_store(name)
    with closing(open_store(into, create=True)) as store, closing(open_store(into)) as reads:
        merge_into(store, reads, [str(c.n1), str(c.n2)], KeyRing.load(c.trust),
                   clock=c.clock, fast=fast)
    return into


@pytest.mark.parametrize("damage", DAMAGE)
def test_fast_path_gives_the_verdicts_of_the_full_checks(cluster: Cluster, damage: str) -> None:
    if damage:
        tamper.sql(cluster.n1, damage)
    fast, full = _merged(cluster, "fast", fast=True), _merged(cluster, "full", fast=False)
    assert dump(fast) == dump(full)
    assert any(ln.startswith("records:") for ln in dump(fast))


@pytest.mark.parametrize(("damage", "finding"), [
    ("UPDATE per SET kind = CAST(kind AS BLOB) WHERE seq=3", ("TAMPERED", 3)),
    ("UPDATE per SET job_id = CAST(job_id AS BLOB) WHERE seq=3", ("TAMPERED", 3)),
    ("UPDATE per SET time_ns = 'noon' WHERE seq=4", ("TAMPERED", 4)),
    ("UPDATE per SET key_id = CAST(key_id AS BLOB) WHERE seq=5", ("UNKNOWN_KEY", 5)),
    ("UPDATE per SET job_id = CAST(X'31FF' AS TEXT) WHERE seq=3", ("TAMPERED", 3)),
    # the bytes are what is hashed: a BLOB rewritten as TEXT of the same bytes is intact
    ("UPDATE per SET body = CAST(body AS TEXT) WHERE seq=2", None),
    ("UPDATE per SET hash = CAST(hash AS TEXT) WHERE seq=2", None),
])
def test_a_column_of_another_type_gets_the_verdict_of_verify(
        cluster: Cluster, damage: str, finding: tuple[str, int] | None) -> None:
    """Not a crash, and the seq `sparkctl verify` names."""
    tamper.sql(cluster.n1, damage)
    summary = merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust)
    report = verify_ledger(cluster.n1, load_hmac_key(cluster.root / "keys-n1" / "hmac.key"))
    assert [(f.code, f.seq) for f in summary.findings] == ([finding] if finding else [])
    assert report.first_bad_seq == (finding[1] if finding else None)
    assert summary.appended == (finding[1] if finding else report.count)


class Spy:
    """A check that accepts the first `limit` rows and remembers what it was shown."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: list[RawRecord] = []

    def __call__(self, rec: Sequence[Any]) -> bytes | None:
        if len(self.seen) >= self.limit:
            return None
        self.seen.append(RawRecord._make(rec))
        return sha256(b"\x00" + rec[4]).digest()

    def stop(self, code: str, seq: int, why: str) -> None:
        self.limit = 0

    def restart(self) -> None:
        self.seen = []


@pytest.mark.parametrize("limit", [0, 1, 7, 10_000])
def test_the_rows_stored_are_the_rows_the_check_saw(cluster: Cluster, limit: int) -> None:
    """The store's half of the contract: rows go in through the check, the prefix it
    accepts is stored byte for byte, nothing after the first refusal."""
    spy = Spy(limit)
    with closing(open_store(cluster.db, create=True)) as store:
        with store.writer(cluster.n1) as w:
            state = w.lock_node("n1", None)
            count = w.append(state, 0, spy)
        stored = query(store, "SELECT seq, time_ns, kind, job_id, body, prev_hash, hash, mac,"
                       " key_id FROM records ORDER BY seq")
    source = [tuple(r) for r in tamper.rows(cluster.n1)]
    assert count == min(limit, len(source)) == len(spy.seen)
    assert stored == source[:count] == [tuple(r) for r in spy.seen]


def test_only_the_new_rows_are_read(cluster: Cluster, tmp_path: Path) -> None:
    assert merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust).ok
    held = len(tamper.rows(cluster.n1))
    with Ledger.open(cluster.n1, load_hmac_key(tmp_path / "keys-n1" / "hmac.key"),
                     load_signing_key(tmp_path / "keys-n1" / "node.key"), node="n1",
                     clock=cluster.clock) as led:
        write_job(led, cluster.clock, "n1", "300", [0], {0: 42})
    added = len(tamper.rows(cluster.n1)) - held
    # an already-merged record damaged on the node is not read again: the head's copy
    # is the verified one (the witness and `sparkctl verify` watch the node's history)
    tamper.sql(cluster.n1, "UPDATE per SET body = CAST('old' AS BLOB) WHERE seq = 3")
    summary = merge_ledgers(cluster.db, [str(cluster.n1)], keys_dir=cluster.trust)
    assert summary.ok and summary.appended == added
    assert summary.results[0].read == added


def test_unmerged_wal_frames_are_read(tmp_path: Path) -> None:
    """A ledger still open by its writer (frames only in its WAL) is read whole."""
    files = keygen(tmp_path / "keys")
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(files.public_key, trust / "w1.pub")
    path = tmp_path / "w1.db"
    with Ledger.open(path, load_hmac_key(files.hmac_key), load_signing_key(files.signing_key),
                     node="w1") as led:
        led.append_many([("cap", {"v": 1, "node": "w1", "job_id": str(i)}) for i in range(50)])
        wal = Path(f"{path}-wal")
        assert wal.exists() and wal.stat().st_size > 0
        summary = merge_ledgers(tmp_path / "cluster.db", [str(path)], keys_dir=trust)
        assert summary.ok and summary.appended == led.size


@pytest.mark.parametrize(("body", "want"), [
    (b'{"body":{"ref":{"seq":7}}}', 7),
    (b'{"body":{"ref":{"seq":true}}}', True),
    (b'{"body":{"ref":{"seq":99999999999999999999}}}', None),  # does not fit SQLite
    (b'{"body":{"ref":{"seq":9223372036854775807}}}', 2**63 - 1),  # the largest that does
    (b'{"body":{"ref":{"seq":9223372036854775808}}}', None),
    (b'{"body":{"ref":{"seq":-9223372036854775808}}}', -2**63),
    (b'{"body":{"ref":{"seq":-9223372036854775809}}}', None),
    (b'{"body":{"ref":{"seq":"7"}}}', None),
    (b'{"body":{"ref":7}}', None),
    (b'{"body":{"ref":', None),
    (b'{"body":{}}', None),
    (b'["ref":]', None),
])
def test_ref_seq_of(body: bytes, want: int | None) -> None:
    assert ref_seq_of(body) == want
