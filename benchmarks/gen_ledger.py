"""Generate a merged cluster ledger of N PERs from M nodes, for the audit benchmark.

Rows are built the way merge stores them — real canonical envelopes, real chain
hashes, Merkle leaves, stored subtrees, compact range and one checkpoint root per
node — but by bulk
insert, not through `Ledger.append` (10 million fsyncs would take hours). Each
job runs on a pair of nodes and leaves admission, cap, facility, throttle,
release and restore records on both, like the daemon does. The file is cached
under benchmarks/out/ and reused while its size and node count match.

    python -m benchmarks.gen_ledger [--pers 10000000] [--nodes 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spark_slurm.canonical import canonical_bytes
from spark_slurm.head.sqlite_store import SqliteStore
from spark_slurm.ledger.chain import GENESIS_PREV, Chain
from spark_slurm.ledger.checkpoint import body_text

OUT = Path(__file__).parent / "out"
T0 = 1_780_000_000_000_000_000
JOB_SPACING_NS = 600 * 1_000_000_000
RECORDS_PER_JOB = 8

_S = "@@"  # placeholder marker, never in real values


def _template(body: dict[str, Any]) -> bytes:
    """Canonical bytes with "@@NAME" string placeholders for values filled per record."""
    return canonical_bytes(body)


def _gpu(i: int) -> dict[str, Any]:
    return {"index": i, "uuid": f"GPU-{i:08d}", "previous_mw": 700000, "intended_mw": _S + "MW",
            "readback_mw": _S + "MW", "ok": True,
            "before": {"time_ns": _S + "T", "power_mw": 650000, "energy_mj": 12345678,
                       "temp_mc": 61000, "util_pct": 97, "limit_mw": 700000,
                       "enforced_mw": 700000, "reasons": 0}}


_CTX = {"job_id": _S + "JOB", "user": "alice", "uid": 1000, "account": "physics",
        "partition": "gpu", "qos": "normal", "class": "training", "gpus": [0, 1],
        "node_mw": 800000, "status": "ok"}
_PATHS = {"telemetry": "ok", "context": "ok", "facility": "pending", "policy": "clamp",
          "ledger": "committed"}
TEMPLATES: dict[str, bytes] = {
    "admission": _template({"v": 1, "node": _S + "NODE", "job_id": _S + "JOB",
                            "decision": "allow", "rule": "gpu-limits", "reason": "within limits",
                            "request": {"gpus": 2, "watts": 800, "raw": "gpu:2,gpupower:800"},
                            "context": _CTX}),
    "cap": _template({"v": 1, "node": _S + "NODE", "job_id": _S + "JOB", "op": "prolog",
                      "requester": {"uid": 0, "user": "root", "role": "scheduler"},
                      "authority": "slurm-prolog", "context": _CTX,
                      "decision": {"action": "clamp", "rule": "class:training", "reason": "max",
                                   "requested_mw": 400000, "granted_mw": 400000,
                                   "policy_sha256": "ab" * 32},
                      "gpus": [_gpu(0), _gpu(1)], "paths": _PATHS}),
    "facility": _template({"v": 1, "node": _S + "NODE", "job_id": _S + "JOB",
                           "ref": {"seq": _S + "REF", "hash": _S + "REFHASH"},
                           "window": {"before": {"mean_mw": 9000000, "min_mw": 8900000,
                                                 "max_mw": 9100000, "samples": 600, "gaps": 0},
                                      "after": {"mean_mw": 8400000, "min_mw": 8300000,
                                                "max_mw": 8500000, "samples": 600, "gaps": 0}},
                           "delta_mw": -600000, "expected_delta_mw": -600000,
                           "tolerance_mw": 100000, "verdict": "correlated"}),
    "throttle": _template({"v": 1, "node": _S + "NODE", "gpu": 0, "temp_mc": 91000,
                           "threshold_mc": 90000, "from_mw": 400000, "to_mw": 250000,
                           "authority": "automation:thermal",
                           "requester": {"uid": 0, "user": "sparkd", "role": "automation"},
                           "paths": dict(_PATHS, policy="allow")}),
    "release": _template({"v": 1, "node": _S + "NODE", "gpu": 0, "temp_mc": 80000,
                          "threshold_mc": 85000, "from_mw": 250000, "to_mw": 400000,
                          "authority": "automation:thermal"}),
    "restore": _template({"v": 1, "node": _S + "NODE", "job_id": _S + "JOB",
                          "requester": {"uid": 0, "user": "root", "role": "scheduler"},
                          "authority": "slurm-epilog",
                          "gpus": [dict(_gpu(0), energy_mj=_S + "E", energy_reset=False),
                                   dict(_gpu(1), energy_mj=_S + "E", energy_reset=False)],
                          "energy_mj": _S + "E2", "paths": dict(_PATHS, policy="allow")}),
    "genesis": _template({"v": 1, "node": _S + "NODE", "cluster": "bench",
                          "created_ns": _S + "T"}),
}
_INT_FIELDS = (b"T", b"MW", b"REF", b"E", b"E2")


def _fill(kind: str, values: dict[bytes, bytes]) -> bytes:
    data = TEMPLATES[kind]
    for name, value in values.items():
        quoted = b'"@@' + name + b'"'
        data = data.replace(quoted, value if name in _INT_FIELDS else b'"' + value + b'"')
    return data


def job_name(pair: int, j: int) -> str:
    return f"{pair}.{j}"


def node_rows(node: int, per_node: int) -> Iterator[tuple[Any, ...]]:
    """A node's rows: (seq, time_ns, kind, job, envelope, prev, hash, mac, key_id, ref, leaf)."""
    name = f"node{node:04d}".encode()
    prev = GENESIS_PREV
    seq = 0
    pair = node // 2
    sha = hashlib.sha256

    def emit(kind: str, t: int, job: str | None, values: dict[bytes, bytes],
             ref: int | None) -> tuple[Any, ...]:
        nonlocal prev, seq
        body = _fill(kind, {b"NODE": name, **values})
        job_json = b"null" if job is None else b'"' + job.encode() + b'"'
        stored = (b'{"body":' + body + b',"job":' + job_json + b',"kind":"' + kind.encode()
                  + b'","seq":' + str(seq).encode() + b',"time_ns":' + str(t).encode() + b"}")
        h = sha(prev + stored).digest()
        row = (seq, t, kind, job, stored, prev, h, None, None, ref, sha(b"\x00" + stored).digest())
        prev = h
        seq += 1
        return row

    yield emit("genesis", T0, None, {b"T": str(T0).encode()}, None)
    j = 0
    while seq + RECORDS_PER_JOB <= per_node:
        job = job_name(pair, j)
        jb = job.encode()
        t = T0 + j * JOB_SPACING_NS + (node % 2) * 1_000_000
        yield emit("admission", t, job, {b"JOB": jb}, None)
        cap_seq, cap_hash = seq, None
        row = emit("cap", t + 1_000_000, job, {b"JOB": jb, b"T": str(t).encode(),
                                                b"MW": b"400000"}, None)
        cap_hash = row[6]
        yield row
        yield emit("facility", t + 31_000_000_000, job,
                   {b"JOB": jb, b"REF": str(cap_seq).encode(), b"REFHASH": cap_hash.hex().encode()},
                   cap_seq)
        th_seq = seq
        row = emit("throttle", t + 120_000_000_000, None, {}, None)
        yield row
        yield emit("facility", t + 150_000_000_000, job,
                   {b"JOB": jb, b"REF": str(th_seq).encode(), b"REFHASH": row[6].hex().encode()},
                   th_seq)
        yield emit("release", t + 200_000_000_000, None, {}, None)
        rs_seq = seq
        row = emit("restore", t + 500_000_000_000, job,
                   {b"JOB": jb, b"T": str(t).encode(), b"MW": b"700000",
                    b"E": b"180000000", b"E2": b"360000000"}, None)
        yield row
        yield emit("facility", t + 530_000_000_000, job,
                   {b"JOB": jb, b"REF": str(rs_seq).encode(), b"REFHASH": row[6].hex().encode()},
                   rs_seq)
        j += 1
    while seq < per_node:
        yield emit("release", T0 + j * JOB_SPACING_NS, None, {}, None)


def generate(path: Path, pers: int, nodes: int, progress: bool = True) -> Path:
    """Write the merged ledger (replacing any file at `path`)."""
    per_node = max(RECORDS_PER_JOB + 1, pers // nodes)
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    SqliteStore.open(tmp, create=True).close()
    conn = sqlite3.connect(tmp)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-400000")
    found = conn.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND "
                         "tbl_name='records' AND sql IS NOT NULL").fetchall()
    indexes = [sql for _, sql in found]
    for name, _ in found:  # bulk load first, index after: several times faster
        conn.execute(f"DROP INDEX {name}")
    started = time.perf_counter()
    for n in range(nodes):
        _store(conn, n, list(node_rows(n, per_node)))
        if progress and (n + 1) % max(1, nodes // 20) == 0:
            rate = (n + 1) * per_node / (time.perf_counter() - started)
            print(f"  generated {n + 1}/{nodes} nodes ({rate:,.0f} PER/s)", file=sys.stderr,
                  flush=True)
    conn.commit()
    for sql in indexes:
        conn.execute(sql)
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()
    tmp.replace(path)
    return path


def _store(conn: sqlite3.Connection, n: int, rows: list[tuple[Any, ...]]) -> None:
    name = f"node{n:04d}"
    cur = conn.execute("INSERT INTO nodes(name, origin) VALUES (?, ?)",
                       (name, f"spark/bench/{name}"))
    node_id = cur.lastrowid
    conn.executemany(
        "INSERT INTO records(node_id, seq, time_ns, kind, job_id, body, prev_hash, hash, mac,"
        " key_id, ref_seq, leaf) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [(node_id, *r) for r in rows])
    frontier = Chain()
    frontier.subtrees = []
    frontier.add_leaves([r[10] for r in rows], [r[6] for r in rows])
    conn.executemany("INSERT INTO subtrees VALUES (?,?,?,?)",
                     [(node_id, lv, i, h) for lv, i, h in frontier.subtrees])
    head = rows[-1][6].hex()
    conn.execute("UPDATE nodes SET head_seq=?, head_hash=?, count=?, frontier=? WHERE node_id=?",
                 (rows[-1][0], head, len(rows), frontier.to_bytes(), node_id))
    conn.execute("INSERT INTO checkpoints(node_id, size, root, text, source) VALUES "
                 "(?,?,?,?,?)", (node_id, len(rows), frontier.root().hex(),
                                 body_text(f"spark/bench/{name}", len(rows), frontier.root(),
                                           head), "ledger"))


def cached(pers: int, nodes: int) -> Path:
    """The cached ledger for this size, generated when missing."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"cluster-{pers}-{nodes}.db"
    if not path.exists():
        generate(path, pers, nodes)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pers", type=int, default=10_000_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    path = generate(args.out, args.pers, args.nodes) if args.out else cached(args.pers, args.nodes)
    print(f"{path}: {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
