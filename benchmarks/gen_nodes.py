"""Node ledgers for the head-node benchmarks, written through the real `Ledger`.

Each node runs jobs the way the daemon records them (admission, cap, facility
follow-up, throttle, its follow-up, release, restore, its follow-up: 8 records,
~0.5-1 KB each, follow-ups carrying `ref`), with HMAC epochs and a signed
checkpoint every CHECKPOINT_EVERY records, and the clock moving a job every ten
minutes. A fleet is cached under benchmarks/out/ and reused while its shape
matches; the trust directory the head node needs sits beside it.

    python -m benchmarks.gen_nodes --nodes 500 --per-node 2000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key

OUT = Path(__file__).parent / "out"
CHECKPOINT_EVERY = 1000
JOB_RECORDS = 8
T0 = 1_780_000_000_000_000_000


@dataclass(frozen=True)
class Fleet:
    root: Path
    trust: Path
    ledgers: list[Path]
    per_node: int


def _gpu(i: int, t: int, mw: int) -> dict[str, Any]:
    return {"index": i, "uuid": f"GPU-{i:08d}", "previous_mw": 700000, "intended_mw": mw,
            "readback_mw": mw, "ok": True,
            "before": {"time_ns": t, "power_mw": 650000, "energy_mj": 12345678,
                       "temp_mc": 61000, "util_pct": 97, "limit_mw": 700000,
                       "enforced_mw": 700000, "reasons": 0}}


def _job(node: str, job: str, t: int, first_seq: int) -> list[tuple[str, dict[str, Any]]]:
    """The 8 records of one job, follow-ups pointing at the seqs they will get."""
    ctx = {"job_id": job, "user": "alice", "uid": 1000, "account": "physics",
           "partition": "gpu", "qos": "normal", "class": "training", "gpus": [0, 1],
           "node_mw": 800000, "status": "ok"}
    paths = {"telemetry": "ok", "context": "ok", "facility": "pending", "policy": "clamp",
             "ledger": "committed"}
    who = {"uid": 0, "user": "root", "role": "scheduler"}
    window = {"before": {"mean_mw": 9000000, "samples": 600, "gaps": 0},
              "after": {"mean_mw": 8400000, "samples": 600, "gaps": 0}}

    def follow(ref: int) -> dict[str, Any]:
        return {"v": 1, "node": node, "job_id": job, "ref": {"seq": ref}, "window": window,
                "delta_mw": -600000, "expected_delta_mw": -600000, "tolerance_mw": 100000,
                "verdict": "correlated"}

    cap, throttle, restore = first_seq + 1, first_seq + 3, first_seq + 6
    return [
        ("admission", {"v": 1, "node": node, "job_id": job, "decision": "allow",
                       "rule": "gpu-limits", "request": {"gpus": 2, "watts": 800},
                       "context": ctx}),
        ("cap", {"v": 1, "node": node, "job_id": job, "op": "prolog", "requester": who,
                 "authority": "slurm-prolog", "context": ctx,
                 "decision": {"action": "clamp", "rule": "class:training",
                              "requested_mw": 400000, "granted_mw": 400000},
                 "gpus": [_gpu(0, t, 400000), _gpu(1, t, 400000)], "paths": paths}),
        ("facility", follow(cap)),
        ("throttle", {"v": 1, "node": node, "gpu": 0, "temp_mc": 91000, "threshold_mc": 90000,
                      "from_mw": 400000, "to_mw": 250000, "authority": "automation:thermal",
                      "paths": dict(paths, policy="allow")}),
        ("facility", follow(throttle)),
        ("release", {"v": 1, "node": node, "gpu": 0, "temp_mc": 80000, "threshold_mc": 85000,
                     "from_mw": 250000, "to_mw": 400000, "authority": "automation:thermal"}),
        ("restore", {"v": 1, "node": node, "job_id": job, "requester": who,
                     "authority": "slurm-epilog", "gpus": [_gpu(0, t, 700000), _gpu(1, t, 700000)],
                     "energy_mj": 360000000, "paths": dict(paths, policy="allow")}),
        ("facility", follow(restore)),
    ]


def write_node(root: Path, trust: Path, node: str, records: int) -> Path:
    """One node ledger of about `records` records (whole jobs), its keys in `trust`."""
    files = keygen(root / "keys" / node)
    shutil.copy(files.public_key, trust / f"{node}.pub")
    shutil.copy(files.hmac_key, trust / f"{node}.hmac")
    (trust / f"{node}.hmac").chmod(0o600)
    path = root / f"{node}.db"
    clock = ManualClock(T0)
    with Ledger.open(path, load_hmac_key(files.hmac_key), load_signing_key(files.signing_key),
                     node=node, cluster="bench", clock=clock, epoch_seconds=86400) as led:
        j = 0
        while led.size + JOB_RECORDS <= records:
            batch: list[tuple[str, dict[str, Any]]] = []
            size = led.size
            while len(batch) < CHECKPOINT_EVERY and size + len(batch) + JOB_RECORDS <= records:
                batch += _job(node, f"{node}.{j}", clock.now_ns(), size + len(batch))
                j += 1
            led.append_many(batch)
            led.checkpoint()
            clock.advance(600 * len(batch) // JOB_RECORDS)
            led.maintain()  # seal a finished epoch now, so the next batch's seqs are known
    return path


def fleet(nodes: int, per_node: int, *, progress: bool = True) -> Fleet:
    """The cached fleet of `nodes` ledgers of `per_node` records, generated when missing."""
    root = OUT / f"fleet-{nodes}x{per_node}"
    trust = root / "trust"
    ledgers = [root / f"b{n:05d}.db" for n in range(nodes)]
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        trust.mkdir(parents=True)
        started = time.perf_counter()
        for n in range(nodes):
            write_node(root, trust, f"b{n:05d}", per_node)
            if progress and (n + 1) % max(1, nodes // 10) == 0:
                print(f"  wrote {n + 1}/{nodes} node ledgers "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        (root / "done").write_text("ok\n")
    return Fleet(root, trust, ledgers, per_node)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--per-node", type=int, default=2000)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    built = fleet(args.nodes, args.per_node)
    print(f"{built.root}: {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
