"""Node ledgers with realistic PER bodies (docs/per-schema.md), written through the
real Ledger API, for merge/audit/replay tests until and beside the real daemon."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spark_slurm.clock import ManualClock
from spark_slurm.head.merge import MergeSummary, merge_ledgers, positions
from spark_slurm.ledger import Ledger
from spark_slurm.ledger.keys import keygen, load_hmac_key, load_signing_key
from spark_slurm.policy import Policy, PowerRequest
from tests.unit.head import tamper

if TYPE_CHECKING:
    from tests.unit.head.conftest import Cluster

POLICY = Policy.load(Path(__file__).resolve().parents[3] / "etc" / "policy.yaml")
POLICY_TEXT = POLICY.text
POLICY_SHA = POLICY.sha256
HW_MIN, HW_MAX = 200000, 700000
PATHS_OK = {"telemetry": "ok", "context": "ok", "facility": "pending", "policy": "clamp",
            "ledger": "committed"}


@dataclass
class NodeKeys:
    hmac: bytes
    signing: Any
    dir: Path


def make_keys(root: Path, node: str, trust_dir: Path) -> NodeKeys:
    """Node key pair via the ledger's keygen; the head node trusts <node>.pub/.hmac."""
    files = keygen(root / f"keys-{node}")
    trust_dir.mkdir(exist_ok=True)
    shutil.copy(files.public_key, trust_dir / f"{node}.pub")
    shutil.copy(files.hmac_key, trust_dir / f"{node}.hmac")
    (trust_dir / f"{node}.hmac").chmod(0o600)
    return NodeKeys(load_hmac_key(files.hmac_key), load_signing_key(files.signing_key),
                    files.hmac_key.parent)


def ctx(job: str, node: str, gpus: list[int], node_mw: int) -> dict[str, Any]:
    """Job context as the daemon records it (JobFacts.body())."""
    return {"job_id": job, "user": "alice", "uid": 1000, "account": "physics",
            "partition": "gpu", "qos": "normal", "class": "training", "gpus": gpus,
            "node_mw": node_mw, "status": "ok"}


def decide(gpus: int, node_mw: int) -> dict[str, Any]:
    """The decision the real policy gives, as the daemon records it."""
    return POLICY.evaluate(PowerRequest(
        op="prolog", gpus=gpus, requested_mw_per_gpu=node_mw // gpus, account="physics",
        partition="gpu", qos="normal", workload_class="training", role="scheduler",
        hw_min_mw=HW_MIN, hw_max_mw=HW_MAX)).to_body()


def gpu_entry(i: int, previous: int, new: int, t: int, power: int, energy: int = 0
              ) -> dict[str, Any]:
    return {"index": i, "uuid": f"GPU-{i:04d}", "previous_mw": previous, "intended_mw": new,
            "readback_mw": new, "ok": True,
            "before": {"time_ns": t, "power_mw": power, "energy_mj": energy, "temp_mc": 55000,
                       "util_pct": 90, "limit_mw": previous, "enforced_mw": previous,
                       "reasons": 0, "min_mw": HW_MIN, "max_mw": HW_MAX}}


def write_job(led: Ledger, clock: ManualClock, node: str, job: str, gpus: list[int],
              energy_mj: dict[int, int], *, facility: str = "correlated",
              throttle: bool = False, node_mw: int | None = None,
              decision: dict[str, Any] | None = None) -> None:
    """The PERs one job leaves on one node: admission, cap, facility, (throttle,
    release), restore with energy, facility."""
    scheduler = {"uid": 0, "user": "root", "role": "scheduler"}
    node_mw = node_mw if node_mw is not None else 400000 * len(gpus)
    dec = decision if decision is not None else decide(len(gpus), node_mw)
    granted = int(dec["granted_mw"])
    led.append("admission", {"v": 1, "node": node, "job_id": job, "decision": "allow",
                             "rule": "default", "reason": "within limits",
                             "request": {"gpus": len(gpus), "watts": node_mw // 1000,
                                         "raw": f"gpu:{len(gpus)},gpupower:{node_mw // 1000}"},
                             "context": ctx(job, node, gpus, node_mw)})
    clock.advance(1)
    t = clock.now_ns()
    cap = led.append("cap", {
        "v": 1, "node": node, "job_id": job, "op": "prolog", "requester": scheduler,
        "authority": "slurm-prolog", "context": ctx(job, node, gpus, node_mw), "decision": dec,
        "gpus": [gpu_entry(i, 700000, granted, t, 650000) for i in gpus],
        "paths": dict(PATHS_OK, policy=str(dec["action"]))})
    clock.advance(30)
    led.append("facility", {"v": 1, "node": node, "job_id": job,
                            "ref": {"seq": cap.seq, "hash": cap.hash},
                            "window": {"before": {"mean_mw": 9000000, "min_mw": 8900000,
                                                  "max_mw": 9100000, "samples": 600, "gaps": 0},
                                       "after": {"mean_mw": 8500000, "min_mw": 8400000,
                                                 "max_mw": 8600000, "samples": 600, "gaps": 0}},
                            "delta_mw": -500000, "expected_delta_mw": -500000,
                            "tolerance_mw": 100000, "verdict": facility})
    if throttle:
        clock.advance(60)
        th = led.append("throttle", {"v": 1, "node": node, "gpu": gpus[0], "temp_mc": 91000,
                                     "threshold_mc": 90000, "from_mw": granted, "to_mw": 250000,
                                     "authority": "automation:thermal",
                                     "requester": {"uid": 0, "user": "sparkd",
                                                   "role": "automation"},
                                     "paths": dict(PATHS_OK, policy="allow")})
        clock.advance(30)
        led.append("facility", {"v": 1, "node": node, "ref": {"seq": th.seq, "hash": th.hash},
                                "window": {}, "delta_mw": -150000, "expected_delta_mw": -150000,
                                "tolerance_mw": 100000, "verdict": "correlated"})
        clock.advance(30)
        led.append("release", {"v": 1, "node": node, "gpu": gpus[0], "temp_mc": 80000,
                               "threshold_mc": 85000, "from_mw": 250000, "to_mw": granted,
                               "authority": "automation:thermal"})
    clock.advance(600)
    t = clock.now_ns()
    restore = led.append("restore", {
        "v": 1, "node": node, "job_id": job, "requester": scheduler, "authority": "slurm-epilog",
        "gpus": [dict(gpu_entry(i, granted, 700000, t, 380000), energy_mj=energy_mj[i],
                      energy_reset=False) for i in gpus],
        "energy_mj": sum(energy_mj.values()),
        "paths": dict(PATHS_OK, policy="allow")})
    clock.advance(30)
    led.append("facility", {"v": 1, "node": node, "job_id": job,
                            "ref": {"seq": restore.seq, "hash": restore.hash},
                            "window": {}, "delta_mw": 500000, "expected_delta_mw": 500000,
                            "tolerance_mw": 100000, "verdict": "correlated"})
    clock.advance(5)


def build_node(root: Path, node: str, trust: Path, clock: ManualClock,
               jobs: list[tuple[str, list[int], dict[int, int]]], *, throttle: bool = False,
               checkpoint: bool = True, hmac: bool = True) -> Path:
    """A node ledger holding a policy snapshot and the given jobs; returns its path."""
    keys = make_keys(root, node, trust)
    path = root / f"{node}.db"
    with Ledger.open(path, keys.hmac if hmac else None, keys.signing, node=node,
                     cluster="spark", clock=clock) as led:
        led.append("policy", dict(POLICY.snapshot_body(), node=node))
        for job, gpus, energy in jobs:
            write_job(led, clock, node, job, gpus, energy, throttle=throttle)
        if checkpoint:
            led.checkpoint()
    return path


def merge(c: Cluster, *sources: Path | str) -> MergeSummary:
    """Merge sources into the cluster's store with its trust store and clock."""
    return merge_ledgers(c.db, [str(s) for s in sources], keys_dir=c.trust, clock=c.clock)


def found(summary: MergeSummary) -> list[tuple[str, str, int | None]]:
    return [(f.code, f.node, f.seq) for f in summary.findings]


def k0(c: Cluster) -> bytes:
    return load_hmac_key(c.root / "keys-n1" / "hmac.key")


def more(c: Cluster, path: Path, job: str) -> None:
    """Node n1 writes one more job to the ledger at `path`."""
    keys = c.root / "keys-n1"
    with Ledger.open(path, k0(c), load_signing_key(keys / "node.key"), node="n1",
                     clock=c.clock) as led:
        write_job(led, c.clock, "n1", job, [0], {0: 42})


def hold_genesis_only(c: Cluster) -> None:
    """The head node holds n1's genesis record and nothing else (head seq 0, which
    is not "nothing held"), merged from a copy of n1's ledger cut back to it."""
    first = c.root / "n1-genesis.db"
    shutil.copy(c.n1, first)
    tamper.sql(first, "DELETE FROM per WHERE seq > 0")
    tamper.sql(first, "DELETE FROM checkpoint")
    assert merge(c, first).ok and positions(c.db, ["n1"])[0].head_seq == 0
