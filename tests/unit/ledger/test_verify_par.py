"""The parallel verifier agrees with the sequential walk: same state on a good
ledger, and on any tampering the same first bad seq and reason (or it declines and
the sequential walk runs)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from spark_slurm.ledger import hmac_epochs as he
from spark_slurm.ledger import verify_ledger
from spark_slurm.ledger.records import envelope_suffix
from spark_slurm.ledger.scan_worker import envelope_tail
from spark_slurm.ledger.schema import open_existing
from spark_slurm.ledger.verify_par import CHUNK_BITS, MIN_CHUNKS, walk_parallel, workers
from spark_slurm.ledger.verify_walk import Bad, Walk, walk
from tests.unit.ledger.conftest import Built

N = 90  # epochs of 60 s at 7 s a record: several seals, a rotation, chunks of 8


def _state(w: Walk) -> tuple[object, ...]:
    return (w.count, w.head, w.chain.size, list(w.chain.hashes), dict(w.roots), w.subtrees,
            w.epoch, w.sealed, w.node, w.hmac_id, [(s, k.public_bytes_raw()) for s, k in w.signing])


def _walks(path: Path, k0: bytes | None, need: set[int], bits: int,
           procs: int = 2, *, reference: bool = True) -> tuple[bool, Walk, Walk]:
    conn, meta = open_existing(path)
    try:
        conn.execute("BEGIN")
        ref = Walk(meta, k0, set(need))
        if reference:
            walk(conn, ref)
        par = Walk(meta, k0, set(need))
        done = walk_parallel(conn, path, par, k0, procs=procs, chunk_bits=bits)
    finally:
        conn.close()
    return done, ref, par


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
@pytest.mark.parametrize("with_key", [True, False])
def test_parallel_walk_matches_the_reference(build: Callable[..., Built], bits: int,
                                             with_key: bool) -> None:
    built = build(n=N)
    k0 = built.keys.hmac if with_key else None
    need = {1, 2, 7, 8, 9, 31, 32, 33, N // 2, N, N + 3, N + 50}
    done, ref, par = _walks(built.path, k0, need, bits)
    assert done
    assert _state(par) == _state(ref)
    assert par.integrity == ["ok"]


def test_parallel_walk_without_hmac_ledger(build: Callable[..., Built]) -> None:
    built = build(n=N, hmac=False)
    done, ref, par = _walks(built.path, None, {5, 40}, 2)
    assert done
    assert _state(par) == _state(ref)


def test_small_ledger_or_one_cpu_stays_sequential(build: Callable[..., Built]) -> None:
    built = build(n=N)
    assert not _walks(built.path, built.keys.hmac, set(), 10)[0]  # under MIN_CHUNKS chunks
    assert not _walks(built.path, built.keys.hmac, set(), 2, procs=1)[0]
    assert MIN_CHUNKS >= 2 and CHUNK_BITS >= 10


def test_parallel_walk_while_other_threads_run(build: Callable[..., Built]) -> None:
    built = build(n=N)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        done, ref, par = _walks(built.path, built.keys.hmac, {20}, 3)
    finally:
        stop.set()
        other.join()
    assert done
    assert _state(par) == _state(ref)


def _edit_body(path: Path, seq: int) -> None:
    conn = sqlite3.connect(path)
    body = bytes(conn.execute("SELECT body FROM per WHERE seq = ?", (seq,)).fetchone()[0])
    conn.execute("UPDATE per SET body = ? WHERE seq = ?", (body.replace(b"allow", b"alloW"), seq))
    conn.commit()
    conn.close()


def _edit(sql: str) -> Callable[[Path, int], None]:
    def run(path: Path, seq: int) -> None:
        conn = sqlite3.connect(path)
        conn.execute(sql, (seq,))
        conn.commit()
        conn.close()
    return run


def _forge_rechained(path: Path, seq: int) -> None:
    """Edit a body and recompute every later hash (no MAC key): only MACs catch it."""
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT seq, body FROM per WHERE seq >= ? ORDER BY seq",
                        (seq,)).fetchall()
    prev = bytes(conn.execute("SELECT hash FROM per WHERE seq = ?", (seq - 1,)).fetchone()[0])
    for s, body in rows:
        data = bytes(body).replace(b"allow", b"alloW") if s == seq else bytes(body)
        h = hashlib.sha256(prev + data).digest()
        conn.execute("UPDATE per SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                     (data, prev, h, s))
        prev = h
    conn.commit()
    conn.close()


TAMPERS: dict[str, Callable[[Path, int], None]] = {
    "body": _edit_body,
    "hash": _edit("UPDATE per SET hash = zeroblob(32) WHERE seq = ?"),
    "prev": _edit("UPDATE per SET prev_hash = zeroblob(32) WHERE seq = ?"),
    "mac": _edit("UPDATE per SET mac = zeroblob(32) WHERE seq = ?"),
    "no mac": _edit("UPDATE per SET mac = NULL WHERE seq = ?"),
    # stripped as if written without HMAC: only the ledger's own key id says a MAC is due
    "stripped": _edit("UPDATE per SET mac = NULL, key_id = NULL WHERE seq = ?"),
    "key id": _edit("UPDATE per SET key_id = key_id || '0' WHERE seq = ?"),
    # the key id is outside the hash: an epoch no key can be derived for in time
    "far epoch": _edit("UPDATE per SET key_id = substr(key_id, 1, instr(key_id, ':'))"
                       " || '1000000000000' WHERE seq = ?"),
    "time": _edit("UPDATE per SET time_ns = time_ns + 1 WHERE seq = ?"),
    "kind": _edit("UPDATE per SET kind = 'zzz' WHERE seq = ?"),
    "job": _edit("UPDATE per SET job_id = 'x' WHERE seq = ?"),
    # a column of another type: no envelope part may be taken for it
    "job type": _edit("UPDATE per SET job_id = 7 WHERE seq = ?"),
    "kind type": _edit("UPDATE per SET kind = CAST(kind AS BLOB) WHERE seq = ?"),
    "text body": _edit("UPDATE per SET body = CAST(body AS TEXT) WHERE seq = ?"),
    "deleted": _edit("DELETE FROM per WHERE seq = ?"),
    "rechained": _forge_rechained,
}


def _verdict(path: Path, k0: bytes, bits: int, parallel: bool) -> tuple[object, ...] | None:
    """(first bad seq, reason) the walk raises; None when the parallel one declines."""
    conn, meta = open_existing(path)
    try:
        conn.execute("BEGIN")
        w = Walk(meta, k0, set())
        if parallel:
            if not walk_parallel(conn, path, w, k0, procs=2, chunk_bits=bits):
                assert w.count == 0 and w.signing == []  # left untouched for the sequential walk
                return None
        else:
            walk(conn, w)
    except Bad as exc:
        return (exc.seq, exc.reason)
    finally:
        conn.close()
    return ("ok",)


@pytest.mark.parametrize("what", sorted(TAMPERS))
@pytest.mark.parametrize("seq", [1, 8, 9, 16, 45, N])
def test_tampering_gets_the_same_verdict(build: Callable[..., Built], what: str,
                                         seq: int) -> None:
    built = build(n=N)
    TAMPERS[what](built.path, seq)
    if what == "text body":  # CAST gives the same bytes: not tampering to either walk
        done, ref, par = _walks(built.path, built.keys.hmac, set(), 3)
        assert done
        assert _state(par) == _state(ref)
        return
    reference = _verdict(built.path, built.keys.hmac, 3, parallel=False)
    assert reference is not None and reference != ("ok",)
    parallel = _verdict(built.path, built.keys.hmac, 3, parallel=True)
    assert parallel in (None, reference)
    report = verify_ledger(built.path, built.keys.hmac)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, *reference)


@pytest.mark.parametrize("seq", [7, 23, 12, 33])
def test_a_missing_record_is_named_whichever_walk_runs(build: Callable[..., Built],
                                                       seq: int) -> None:
    """The parallel walk does not count rows before it starts: a record missing inside
    a chunk is that chunk's finding; one missing at a chunk's end (its last seq, with
    chunks of 8) leaves the next chunk without the hash it starts from, and the
    parallel walk declines."""
    built = build(n=N)
    TAMPERS["deleted"](built.path, seq)
    reference = _verdict(built.path, built.keys.hmac, 3, parallel=False)
    assert reference == (seq, f"record {seq} is missing (next stored is {seq + 1})")
    parallel = _verdict(built.path, built.keys.hmac, 3, parallel=True)
    assert parallel == (None if seq % 8 == 7 else reference)
    report = verify_ledger(built.path, built.keys.hmac)
    assert (report.ok, report.first_bad_seq, report.reason) == (False, *reference)


def _big_ledger(tmp_path: Path) -> tuple[Path, bytes]:
    from spark_slurm.ledger import Ledger  # noqa: PLC0415
    from spark_slurm.ledger.keys import keygen, load_hmac_key  # noqa: PLC0415

    k0 = load_hmac_key(keygen(tmp_path / "keys").hmac_key)
    path = tmp_path / "big.db"
    with Ledger.open(path, k0, node="n1", cluster="c1") as led:
        batch = [("cap", {"v": 1, "job_id": str(i % 7), "power_mw": i}) for i in range(2000)]
        while led.size < MIN_CHUNKS << CHUNK_BITS:
            led.append_many(batch)
    return path, k0


def test_verify_ledger_takes_the_parallel_path_with_the_same_verdicts(tmp_path: Path) -> None:
    path, k0 = _big_ledger(tmp_path)
    conn, meta = open_existing(path)
    conn.execute("BEGIN")
    par = Walk(meta, k0, set())
    assert walk_parallel(conn, path, par, k0, procs=2)
    conn.close()
    good = verify_ledger(path, k0)
    assert good.ok and good.count == par.count and good.head == par.head.hex()
    assert good.parallel == (workers() >= 2)  # what `sparkctl verify --json` reports
    seq = (1 << CHUNK_BITS) + 3  # in the second chunk
    key = he.EpochKeys(k0).key(0)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE per SET mac = ? WHERE seq = ?", (he.mac(key, b"x" * 32), seq))
    conn.commit()
    conn.close()
    bad = verify_ledger(path, k0)
    assert (bad.ok, bad.first_bad_seq, bad.reason) == (
        False, seq, "MAC does not verify with the epoch 0 key")


@pytest.mark.parametrize("kind", ["cap", "key", "a.b-c_d"])
@pytest.mark.parametrize("job", [None, "7", "7_1", 'we"ird\\ ü\n', "x y", "[1]"])
def test_worker_envelope_tail_is_the_writers(kind: str, job: str | None) -> None:
    whole = envelope_suffix(42, 7, kind, job)
    assert whole == envelope_tail(kind, job) + b'42,"time_ns":7}'
