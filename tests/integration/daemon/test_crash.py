"""Crash safety: SIGKILL under concurrent load loses no acknowledged PER and no cap."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import namedtuple
from typing import Any

from spark_slurm.daemon.state import GOVERNING_KINDS, governed_from_records
from spark_slurm.errors import DaemonUnavailable
from spark_slurm.ledger import verify_ledger
from tests.integration.daemon.conftest import Sparkd

Rec = namedtuple("Rec", "kind body")


def _worker(sparkd: Sparkd, gpu: int, tag: str, acked: list[dict[str, Any]],
            stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        job = f"{tag}{gpu}x{i}"
        i += 1
        steps: list[dict[str, Any]] = [
            {"op": "prolog", "job_id": job, "user": "u4242", "uid": 4242, "partition": "gpu",
             "account": "physics", "gpus": [gpu], "watts": random.choice([300, 450, 600])},
            {"op": "cap", "job_id": job, "watts_per_gpu": random.choice([250, 350])},
            {"op": "epilog", "job_id": job, "gpus": [gpu]},
        ]
        for step in steps[: random.choice([1, 2, 3, 3])]:
            try:
                reply = sparkd.request(step, timeout=5)
            except (OSError, ValueError, DaemonUnavailable):
                return  # the daemon is gone
            if "seq" in reply:
                acked.append(reply)


def _hashes(sparkd: Sparkd) -> dict[int, str]:
    conn = sqlite3.connect(f"file:{sparkd.state_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        return {seq: bytes(h).hex() for seq, h in conn.execute("SELECT seq, hash FROM per")}
    finally:
        conn.close()


def _check(sparkd: Sparkd, acked: list[dict[str, Any]]) -> None:
    report = verify_ledger(sparkd.state_dir / "ledger.db")
    assert report.ok, report
    hashes = _hashes(sparkd)
    for reply in acked:
        assert hashes.get(reply["seq"]) == reply["hash"], f"acknowledged PER {reply} lost"
    restores = [r["body"]["job_id"] for r in sparkd.records("restore")]
    assert len(restores) == len(set(restores)), "a job end with two restore PERs"
    governed = governed_from_records(
        Rec(r["kind"], r["body"]) for r in sparkd.records() if r["kind"] in GOVERNING_KINDS)
    for gpu in range(8):
        assert sparkd.limit_mw(gpu) == governed[gpu], f"GPU {gpu} differs from the ledger"


def test_sigkill_under_concurrent_requests_loses_nothing(sparkd: Sparkd) -> None:
    rng = random.Random(20261123)
    acked: list[dict[str, Any]] = []
    for round_ in range(3):
        sparkd.start()
        if round_:
            # start-up restored the orphans the kill left behind and agreed with the ledger
            reconcile = sparkd.records("reconcile")[-1]["body"]
            assert all(e.get("ok") for e in reconcile["gpus"]), reconcile
            _check(sparkd, acked)
        stop = threading.Event()
        threads = [threading.Thread(target=_worker,
                                    args=(sparkd, g, f"r{round_}g", acked, stop))
                   for g in range(8)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.5))
        sparkd.kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(acked) > 20
    sparkd.start()
    _check(sparkd, acked)
    assert sparkd.request({"op": "status"})["jobs"] == []  # every orphan restored
    assert sparkd.stop() == 0


def test_start_restores_orphans_of_ended_jobs_and_keeps_running_ones(sparkd: Sparkd) -> None:
    sparkd.add_job("501", gpus=[0, 1])
    sparkd.add_job("502", gpus=[2])
    sparkd.fleet.oob_set_limit(2, 700_000)
    sparkd.start()
    assert sparkd.prolog("501", watts=800, gpus=[0, 1])["ok"]
    assert sparkd.prolog("502", watts=400, gpus=[2])["ok"]
    sparkd.kill()  # dies mid-job: no epilog reaches it
    sparkd.jobs["501"]["state"] = "COMPLETED"
    sparkd.write_jobs()
    sparkd.start()
    (restore,) = [r for r in sparkd.records("restore") if r["body"].get("job_id") == "501"]
    assert restore["body"]["authority"] == "automation:startup"
    assert {e["index"]: e["readback_mw"] for e in restore["body"]["gpus"]} == {
        0: 1_000_000, 1: 1_000_000}
    assert sparkd.limit_mw(0) == sparkd.limit_mw(1) == 1_000_000
    reconcile = sparkd.records("reconcile")[-1]["body"]
    assert reconcile["orphans"] == ["501"] and reconcile["kept"] == ["502"]
    assert sparkd.limit_mw(2) == 400_000  # still running: its cap stays
    reply = sparkd.request({"op": "epilog", "job_id": "502"})
    assert reply["ok"] and sparkd.limit_mw(2) == 700_000  # back to the pre-job limit
    _check(sparkd, [reply])
