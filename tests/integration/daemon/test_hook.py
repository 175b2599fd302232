"""The real `spark-hook` against a real sparkd: live prolog/epilog, and the journal path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.daemon.conftest import OWNER_UID, Sparkd

HOOK = str(Path(sys.executable).parent / "spark-hook")


def _hook(sparkd: Sparkd, op: str, job_id: str, mode: str = "fail_open"
          ) -> subprocess.CompletedProcess[str]:
    config = sparkd.root / "hook.json"
    config.write_text(json.dumps({"socket": str(sparkd.socket), "journal": str(sparkd.journal),
                                  "timeout_s": 10, "on_daemon_down": mode}))
    env = {**os.environ, "SPARK_HOOK_CONFIG": str(config), "SLURM_JOB_ID": job_id,
           "SLURM_JOB_USER": "u4242", "SLURM_JOB_UID": str(OWNER_UID),
           "SLURM_JOB_PARTITION": "gpu", "SLURMD_NODENAME": "n1",
           "SLURM_SCRIPT_CONTEXT": f"{op}_slurmd"}
    return subprocess.run([HOOK, op], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_hook_prolog_and_epilog_through_the_daemon(sparkd: Sparkd) -> None:
    sparkd.add_job("701", gpus=[4, 5])  # GPUs and watts come from the job context
    sparkd.jobs["701"]["gpupower_w_per_node"] = 900
    sparkd.jobs["701"]["admin_comment"] = ("spark:v=1,watts=900,gpus=2,wpg=450,class=training,"
                                           "rule=class:training,policy=abcd,injected=1")
    sparkd.write_jobs()
    sparkd.start()
    out = _hook(sparkd, "prolog", "701")
    assert out.returncode == 0, out.stderr
    assert sparkd.limit_mw(4) == sparkd.limit_mw(5) == 450_000
    cap = next(r for r in sparkd.records("cap") if r["body"].get("job_id") == "701")["body"]
    assert cap["context"]["gpus"] == [4, 5] and cap["context"]["node_mw"] == 900_000
    assert cap["context"]["class"] == "training"
    (admission,) = sparkd.records("admission")
    assert admission["body"]["decision"] == "inject"
    assert admission["body"]["rule"] == "class:training" and admission["body"]["job_id"] == "701"
    out = _hook(sparkd, "epilog", "701")
    assert out.returncode == 0, out.stderr
    assert sparkd.limit_mw(4) == sparkd.limit_mw(5) == 1_000_000


def test_daemon_down_journal_then_ingest_at_start(sparkd: Sparkd) -> None:
    sparkd.add_job("702", gpus=[6])
    sparkd.jobs["702"]["gpupower_w_per_node"] = 350
    sparkd.write_jobs()
    out = _hook(sparkd, "prolog", "702", mode="fail_open")  # no daemon yet
    assert out.returncode == 0 and "journaled" in out.stderr
    assert _hook(sparkd, "prolog", "703", mode="fail_closed").returncode == 1
    sparkd.start()
    journal = [r for r in sparkd.records() if r["body"].get("source") == "journal"]
    by_job = {r["body"]["job_id"]: r for r in journal}
    assert by_job["702"]["kind"] == "cap"  # still running: the late prolog applies its cap
    assert by_job["702"]["body"]["journal"]["hook_exit"] == "fail_open"
    assert sparkd.limit_mw(6) == 350_000
    assert by_job["703"]["kind"] == "reject"  # unknown job, no GPUs: refused, still recorded
