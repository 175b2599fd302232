"""Disk full as a designed fail mode, on a real (small) tmpfs under a real sparkd.

Low space first makes sparkd unhealthy while it still records; once a write
fails, actions are refused before any GPU moves, the hook journals into its
reserve, and what sparkd answered without a record is kept; when space comes
back all of it is ingested or recorded and the ledger verifies.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm import hook
from spark_slurm.ledger import verify_ledger
from tests.integration.daemon.conftest import OWNER_UID, Sparkd, _wait
from tests.integration.daemon.test_hardening import metric, metrics
from tests.integration.daemon.test_hook import _hook
from tests.integration.tmpfs import fill, small_tmpfs

HOOK = str(Path(sys.executable).parent / "spark-hook")


@pytest.fixture
def tight(root: Path) -> Iterator[Sparkd]:
    """A sparkd whose state, ledger and journal live on a 16 MiB tmpfs."""
    with small_tmpfs(root / "state", 16 * 1024) as mount:
        daemon = Sparkd(root)
        journal = mount / "journal.jsonl"
        daemon.journal = journal
        daemon.config.write_text(
            daemon.config.read_text().replace(f"journal_path: {root / 'journal.jsonl'}",
                                              f"journal_path: {journal}")
            + "disk: {min_free_mb: 4, reserve_kb: 64}\n")
        try:
            yield daemon
        finally:
            daemon.stop()


def _reserve(sparkd: Sparkd) -> list[dict[str, Any]]:
    data = Path(str(sparkd.journal) + ".reserve").read_bytes().split(b"\0", 1)[0]
    return [json.loads(line) for line in data.decode().splitlines() if line]


def test_disk_full_is_seen_coming_refused_safely_and_caught_up(tight: Sparkd) -> None:
    sparkd = tight
    mount = sparkd.state_dir
    for job, gpus in (("11", [0]), ("12", [1]), ("13", [2])):
        sparkd.add_job(job, gpus=gpus)
    sparkd.start()
    assert sparkd.prolog("11", watts=400, gpus=[0])["ok"]
    cfg = {"socket": str(sparkd.socket), "journal": str(sparkd.journal), "timeout_s": 5,
           "on_daemon_down": "fail_closed"}

    # 1. low: unhealthy (the health check says why) while everything is still recorded
    low = fill(mount, leave_kib=2048, name="filler-low")
    _wait(lambda: not sparkd.request({"op": "status"})["healthy"], 20, "low space reported")
    status = sparkd.request({"op": "status"})
    assert status["problems"][0].startswith("disk low:") and not status["disk"]["full"]
    assert hook.check_status(cfg, out=(out := _Capture())) == 1
    assert "sparkd unhealthy: disk low" in out.text
    assert metric(metrics(sparkd), "spark_healthy") == 0
    assert sparkd.prolog("12", watts=400, gpus=[1])["ok"]       # still served, recorded

    # 2. full: the first failed write turns the daemon to refusing, GPUs untouched
    fill(mount, leave_kib=0, name="filler-full")
    before = sparkd.limit_mw(1)
    for i in range(400):                                       # the WAL grows until it fails
        reply = sparkd.request({"op": "cap", "job_id": "12", "watts_per_gpu": 300 + i % 50})
        if not reply["ok"]:
            break
        before = sparkd.limit_mw(1)
    assert reply["error"]["code"] == "disk-full" and "seq" not in reply, reply
    assert sparkd.limit_mw(1) == before                        # the unrecorded cap was undone
    assert sparkd.request({"op": "status"})["disk"]["full"] is True
    assert metric(metrics(sparkd), "spark_disk_full") == 1
    user = sparkd.request_as(OWNER_UID, {"op": "cap", "job_id": "12", "watts_per_gpu": 250})
    assert user["error"]["code"] == "disk-full"               # counted for later
    res = _hook(sparkd, "prolog", "13", "fail_closed")          # refused before acting ...
    assert res.returncode == 1 and ".reserve, fail_closed" in res.stderr, res.stderr
    assert sparkd.limit_mw(2) == 1_000_000
    res = _hook(sparkd, "epilog", "11", "fail_open")            # restored, not recorded
    assert res.returncode == 0 and ".reserve" in res.stderr, res.stderr
    assert sparkd.limit_mw(0) == 1_000_000
    journaled = _reserve(sparkd)                               # ... both in the reserve
    assert [(e["op"], e["job_id"]) for e in journaled] == [("prolog", "13"), ("epilog", "11")]

    # 3. space is back: ingested, kept answers recorded, healthy, reserve set aside again
    os.unlink(mount / "filler-full")
    low.unlink()
    _wait(lambda: sparkd.request({"op": "status"})["healthy"], 30, "healthy again")

    def by_job(job: str) -> list[tuple[str, str, str]]:
        return [(r["kind"], r["body"].get("source", ""), r["body"].get("code", ""))
                for r in sparkd.records() if r["body"].get("job_id") == job
                and r["kind"] in ("cap", "restore", "reject")]

    _wait(lambda: ("restore", "journal", "") in by_job("11"), 30, "the epilog ingested")
    assert by_job("11") == [("cap", "socket", ""), ("restore", "journal", "")]
    assert by_job("13") == [("reject", "journal", "failed-closed")]
    kept = [k for k in by_job("12") if k[0] == "reject"]
    assert kept == [("reject", "socket", "disk-full")]         # root's cap, kept one by one
    _wait(lambda: any(r["body"].get("code") == "disk-full" and "suppressed" in r["body"]
                      for r in sparkd.records("reject")), 20, "the user's count recorded")
    (counted,) = [r["body"] for r in sparkd.records("reject") if "suppressed" in r["body"]
                  and r["body"]["code"] == "disk-full"]
    assert counted["requester"]["uid"] == OWNER_UID and counted["suppressed"]["count"] == 1
    _wait(lambda: _reserve(sparkd) == [], 10, "a fresh reserve")
    assert sparkd.prolog("13", watts=300, gpus=[2])["ok"]      # and back to normal
    assert sparkd.stop() == 0
    report = verify_ledger(sparkd.state_dir / "ledger.db")
    assert report.ok, report.reason


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)


def test_a_daemon_that_cannot_write_at_start_says_so_and_exits_1(tight: Sparkd) -> None:
    fill(tight.state_dir, leave_kib=0)
    tight.start(wait=False)
    assert tight.proc is not None
    code = tight.proc.wait(timeout=60)
    tight.proc = None
    assert code == 1  # not 2 (a config error): systemd restarts it until space is back
    assert "cannot record anything, the disk is full" in tight.log_text()
    assert "Traceback" not in tight.log_text()
