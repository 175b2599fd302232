"""Generate a node ledger of N PERs the way sparkd writes one, for the scale benchmarks.

The file is a real ledger written through `Ledger.append_many` (HMAC on, a
signing key, epoch seals, periodic checkpoints) with a manual clock, so verify,
audit and sparkd start-up read exactly what a node that ran for a long time
would hold: a genesis, a `policy` and a start-up `reconcile`, then jobs of
`cap` → facility follow-up → `restore` → follow-up over 8 GPUs. Batches of
`BATCH` records share one commit (a node never writes 10 million fsyncs; the
bytes are the same). Cached under benchmarks/out/ and reused while present.

    python -m benchmarks.gen_node_ledger [--pers 1000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.clock import ManualClock
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key

OUT = Path(__file__).parent / "out"
NODE = "bench1"
CLUSTER = "bench"
GPUS = 8
BATCH = 5000
STEP_S = 0.05  # fake time per record: 1M records span ~14 HMAC epochs of an hour
POLICY_SHA = "ab" * 32


@dataclass(frozen=True, slots=True)
class NodeLedger:
    """A generated ledger and the key files it was written with."""

    path: Path
    keys: Path
    pers: int

    @property
    def hmac_key(self) -> Path:
        return self.keys / "hmac.key"

    @property
    def signing_key(self) -> Path:
        return self.keys / "node.key"

    @property
    def public_key(self) -> Path:
        return self.keys / "node.pub"


def _gpu(index: int, mw: int, t: int) -> dict[str, Any]:
    return {"index": index, "uuid": f"GPU-{index:08d}", "previous_mw": 700_000,
            "intended_mw": mw, "readback_mw": mw, "ok": True,
            "before": {"time_ns": t, "power_mw": 350_123, "temp_mc": 61_000, "util_pct": 97,
                       "limit_mw": 700_000, "enforced_mw": 700_000}}


_PATHS = {"telemetry": "ok", "context": "ok", "facility": "pending", "policy": "clamp",
          "ledger": "committed"}
_REQ = {"uid": 0, "user": "root", "role": "scheduler"}


def job_records(j: int, seq: int, t: int) -> list[tuple[str, dict[str, Any]]]:
    """One job on two of the node's GPUs: cap, its follow-up, restore, its follow-up.
    `seq` is the seq the cap will get (follow-ups name it)."""
    job = str(1_000_000 + j)
    gpus = [(2 * j) % GPUS, (2 * j + 1) % GPUS]
    ctx = {"job_id": job, "user": f"u{j % 97}", "uid": 1000 + j % 97, "account": "physics",
           "partition": "gpu", "qos": "normal", "class": "training", "gpus": gpus}
    cap = {"v": 1, "node": NODE, "job_id": job, "op": "prolog", "source": "socket",
           "requester": _REQ, "authority": "slurm-prolog", "context": ctx,
           "decision": {"action": "clamp", "rule": "class:training", "reason": "class ceiling",
                        "requested_mw": 700_000, "granted_mw": 400_000,
                        "policy_sha256": POLICY_SHA},
           "gpus": [_gpu(g, 400_000, t) for g in gpus], "paths": _PATHS}
    restore = {"v": 1, "node": NODE, "job_id": job, "op": "epilog", "source": "socket",
               "requester": _REQ, "authority": "slurm-epilog",
               "gpus": [dict(_gpu(g, 700_000, t), energy_mj=180_000_000, energy_reset=False)
                        for g in gpus],
               "energy_mj": 360_000_000, "energy_known": True,
               "paths": dict(_PATHS, policy="allow")}

    def follow(ref: int, delta: int) -> dict[str, Any]:
        return {"v": 1, "node": NODE, "job_id": job, "ref": {"seq": ref},
                "window": {"before": {"mean_mw": 9_000_000, "samples": 600, "gaps": 0},
                           "after": {"mean_mw": 9_000_000 + delta, "samples": 600, "gaps": 0}},
                "delta_mw": delta, "expected_delta_mw": delta, "tolerance_mw": 100_000,
                "verdict": "correlated"}

    return [("cap", cap), ("facility", follow(seq, -600_000)), ("restore", restore),
            ("facility", follow(seq + 2, 600_000))]


def _items(start_seq: int, count: int, t: int) -> Iterator[tuple[str, dict[str, Any]]]:
    seq, j = start_seq, 0
    while seq < start_seq + count:
        for item in job_records(j, seq, t):
            if seq >= start_seq + count:
                return
            yield item
            seq += 1
        j += 1


def generate(path: Path, keys: Path, pers: int, progress: bool = True) -> NodeLedger:
    """Write a fresh ledger of `pers` records (genesis included) at `path`."""
    tmp = path.with_name(path.name + ".partial")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    if keys.exists():
        shutil.rmtree(keys)
    files = keygen(keys)
    # the records end about now, as on a node that is still running (a start-up
    # then seals only the epochs that passed since the file was made)
    clock = ManualClock(time.time_ns() - int(pers * STEP_S * 1e9))
    led = Ledger.open(tmp, load_hmac_key(files.hmac_key), load_signing_key(files.signing_key),
                      node=NODE, cluster=CLUSTER, clock=clock, checkpoint_interval_s=900)
    started = time.perf_counter()
    try:
        led.append_many([("policy", {"v": 1, "sha256": POLICY_SHA, "text": "version: 1\n",
                                     "path": "/etc/spark/policy.yaml"}),
                         ("reconcile", {"v": 1, "node": NODE, "source": "automation",
                                        "gpus": [{"index": g, "intended_mw": 700_000,
                                                  "observed_mw": 700_000, "ok": True,
                                                  "action": "baseline"} for g in range(GPUS)],
                                        "orphans": [], "kept": []})])
        items = _items(led.size, pers, clock.now_ns())
        while led.size < pers:
            room = min(BATCH, pers - led.size)
            batch = [next(items) for _ in range(room)]
            led.append_many(batch)
            clock.advance(STEP_S * room)
            led.maintain()  # seals ended epochs (the seal counts against the target)
            if progress and led.size % (BATCH * 40) < BATCH:
                rate = led.size / (time.perf_counter() - started)
                print(f"  {led.size:,}/{pers:,} PERs ({rate:,.0f} PER/s)", file=sys.stderr,
                      flush=True)
        led.checkpoint()
    finally:
        led.close()
    for p in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)  # an older file's, never this one's
    tmp.replace(path)
    return NodeLedger(path, keys, pers)


def cached(pers: int) -> NodeLedger:
    """The cached node ledger of (about) `pers` records, generated when missing."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"node-{pers}.db"
    keys = OUT / f"node-{pers}-keys"
    if path.exists() and (keys / "hmac.key").exists():
        return NodeLedger(path, keys, pers)
    return generate(path, keys, pers)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pers", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, help="ledger file (keys go beside it)")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    if args.out:
        made = generate(args.out, args.out.with_name(args.out.stem + "-keys"), args.pers)
    else:
        made = cached(args.pers)
    print(f"{made.path}: {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
