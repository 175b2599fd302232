"""Issue 7 acceptance on a real cluster: sbatch -> job_submit.lua -> prolog hook ->
sparkd -> sim GPUs -> ledger PERs -> epilog restore, plus the failure cases."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from spark_slurm import hook
from spark_slurm.slurm import SubprocessRunner, open_context_source
from spark_slurm.slurm.context import JobContext
from tests.integration.slurm.stack import GPU_TYPE, SparkStack

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DEFAULT_W = 1000          # the sim b200's default limit: what a restore returns to
SITE_DEFAULT_W = 500      # etc/policy.yaml gpu.default_watts
PATHS = {"telemetry", "context", "facility", "policy", "ledger"}


def context(stack: SparkStack, job: str) -> JobContext:
    src = open_context_source("scontrol", runner=SubprocessRunner(stack.cluster.env))
    return src.get(job)


def field(stack: SparkStack, job: str, key: str) -> str:
    for token in stack.cluster.show_job(job).split():
        if token.startswith(key + "="):
            return token.split("=", 1)[1]
    return ""


def expect_caps(stack: SparkStack, gpus: list[int], watts: int) -> None:
    expect = {i: (watts if i in gpus else DEFAULT_W) for i in range(8)}
    stack.wait_limits(expect)


def journal_entries(stack: SparkStack, job: str) -> list[dict[str, Any]]:
    if not stack.journal.exists():
        return []
    lines = [json.loads(line) for line in stack.journal.read_text().splitlines() if line]
    return [e for e in lines if e.get("job_id") == job]


def cap_body(stack: SparkStack, job: str) -> dict[str, Any]:
    [cap] = stack.wait_records(job, "cap")
    return cap.body


def test_job_is_capped_during_and_restored_after(spark_stack: SparkStack) -> None:
    job = spark_stack.cluster.submit(["-J", "e2e-cap", "--gres=gpu:2,gpupower:800",
                                      "--comment=spark:class=training"], wrap="sleep 6")
    spark_stack.wait_running(job)
    gpus = context(spark_stack, job).gpus_on(spark_stack.cluster.node)
    assert len(gpus) == 2
    expect_caps(spark_stack, gpus, 400)                       # 800 W / 2 GPUs

    cap = cap_body(spark_stack, job)
    assert cap["authority"] == "slurm-prolog"
    assert set(cap["paths"]) == PATHS
    assert cap["paths"]["ledger"] == "committed" and cap["paths"]["policy"] == "allow"
    assert cap["decision"]["granted_mw"] == 400_000
    assert sorted(g["index"] for g in cap["gpus"]) == gpus
    assert all(g["readback_mw"] == 400_000 and g["ok"] for g in cap["gpus"])
    assert all(g["previous_mw"] == DEFAULT_W * 1000 for g in cap["gpus"])

    assert spark_stack.cluster.wait_job(job) == "COMPLETED"
    [restore] = spark_stack.wait_records(job, "restore")
    assert restore.body["authority"] == "slurm-epilog"
    assert all(g["readback_mw"] == DEFAULT_W * 1000 for g in restore.body["gpus"])
    assert restore.body["energy_mj"] > 0
    expect_caps(spark_stack, [], DEFAULT_W)


def test_prolog_records_the_admission_it_saw(spark_stack: SparkStack) -> None:
    job = spark_stack.cluster.submit(["-J", "e2e-admit", "--gres=gpu:1,gpupower:300"],
                                     wrap="true")
    assert spark_stack.cluster.wait_job(job) == "COMPLETED"
    spark_stack.wait_records(job, "restore")
    [admission] = spark_stack.wait_records(job, "admission", timeout=5)
    assert admission.body["decision"] in ("allow", "inject")


def test_over_tenant_limit_is_refused_by_sbatch_and_recorded(spark_stack: SparkStack) -> None:
    res = spark_stack.cluster.sbatch(["-J", "e2e-tenant", "--account=students",
                                      "--gres=gpu:2,gpupower:800"], check=False)
    assert res.returncode != 0
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("sbatch: error: spark:")
    assert "tenant:students" in first and "350 W/GPU" in first
    assert res.stdout.strip() == ""                           # no job was created

    reply = hook.ask_daemon(str(spark_stack.socket), {"op": "ingest", "id": "t"}, 10)
    assert reply["ok"], reply
    denials = [r.body for r in spark_stack.records()
               if r.kind == "admission" and r.body.get("decision") == "deny"
               and r.body.get("rule") == "tenant:students"]
    assert denials, [r.kind for r in spark_stack.records()]
    assert denials[-1]["source"] == "spool"


def test_gpu_job_without_gpupower_gets_the_default(spark_stack: SparkStack) -> None:
    job = spark_stack.cluster.submit(["-J", "e2e-default", "--gres=gpu:1"], wrap="sleep 4")
    assert f"gpupower:{SITE_DEFAULT_W}" in field(spark_stack, job, "TresPerNode")
    spark_stack.wait_running(job)
    ctx = context(spark_stack, job)
    assert ctx.token is not None and ctx.token.injected
    assert ctx.gpupower_w_per_node == SITE_DEFAULT_W
    expect_caps(spark_stack, ctx.gpus_on(spark_stack.cluster.node), SITE_DEFAULT_W)
    spark_stack.cluster.wait_job(job)
    spark_stack.wait_records(job, "restore")


def test_jobs_over_the_node_power_budget_do_not_run_together(spark_stack: SparkStack) -> None:
    # 2 x 2400 W > the node's 4000 W gpupower, while 8 GPUs would fit both.
    first = spark_stack.cluster.submit(["-J", "e2e-budget-a", "--gres=gpu:4,gpupower:2400"],
                                       wrap="sleep 8")
    spark_stack.wait_running(first)
    second = spark_stack.cluster.submit(["-J", "e2e-budget-b", "--gres=gpu:4,gpupower:2400"],
                                        wrap="true")
    for _ in range(10):                                       # while the first still runs
        assert spark_stack.cluster.job_state(first) == "RUNNING"
        assert spark_stack.cluster.job_state(second) == "PENDING"
        time.sleep(0.3)
    assert spark_stack.cluster.wait_job(second, timeout=90) == "COMPLETED"
    assert field(spark_stack, second, "StartTime") >= field(spark_stack, first, "EndTime")
    spark_stack.wait_records(second, "restore")


@pytest.mark.parametrize("args,gpus,watts", [
    (["--gpus-per-task=1", "-n", "2"], 2, SITE_DEFAULT_W),
    ([f"--gres=gpu:{GPU_TYPE}:2,gpupower:1000"], 2, 500),
    ([f"--gpus={GPU_TYPE}:3"], 3, SITE_DEFAULT_W),
])
def test_request_forms_are_capped(spark_stack: SparkStack, args: list[str], gpus: int,
                                  watts: int) -> None:
    job = spark_stack.cluster.submit(["-J", "e2e-forms", *args], wrap="sleep 4")
    spark_stack.wait_running(job)
    held = context(spark_stack, job).gpus_on(spark_stack.cluster.node)
    assert len(held) == gpus
    expect_caps(spark_stack, held, watts)
    assert cap_body(spark_stack, job)["decision"]["granted_mw"] == watts * 1000
    spark_stack.cluster.wait_job(job)
    spark_stack.wait_records(job, "restore")


@pytest.mark.parametrize("gres,words", [
    ("gpu:1,gpupower:0", ["gpupower"]),
    ("gpu:1,gpupower:abc", ["gpupower", "abc"]),
    ("gpu:1,gpupower:99999999", ["gpupower"]),
    ("gpupower:300", ["gpupower", "GPU"]),
])
def test_bad_power_requests_get_a_specific_error(spark_stack: SparkStack, gres: str,
                                                 words: list[str]) -> None:
    res = spark_stack.cluster.sbatch(["-J", "e2e-bad", f"--gres={gres}"], check=False)
    assert res.returncode != 0
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("sbatch: error: spark:"), res.stderr
    for word in words:
        assert word in first, first
    assert "lua" not in first.lower()


def test_scontrol_update_cannot_raise_the_power(spark_stack: SparkStack) -> None:
    job = spark_stack.cluster.submit(["-J", "e2e-update", "--hold",
                                      "--gres=gpu:2,gpupower:800"])
    try:
        res = spark_stack.cluster.run(["scontrol", "update", f"jobid={job}",
                                       "gres=gpu:2,gpupower:1600"], check=False)
        assert res.returncode != 0
        assert "gpupower:800" in field(spark_stack, job, "TresPerNode")
    finally:
        spark_stack.cluster.run(["scancel", job], check=False)


def _nhc(stack: SparkStack, drain: str) -> subprocess.CompletedProcess[str]:
    env = dict(stack.cluster.env, SPARK_NHC_DRAIN=drain)
    return subprocess.run([str(stack.nhc)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_daemon_down_fail_open_runs_the_job_and_journal_becomes_pers(
        spark_stack: SparkStack) -> None:
    assert _nhc(spark_stack, "0").returncode == 0
    spark_stack.stop_daemon()
    try:
        spark_stack.set_hook_mode("fail_open")
        job = spark_stack.cluster.submit(["-J", "e2e-open", "--gres=gpu:1,gpupower:300"],
                                         wrap="true")
        assert spark_stack.cluster.wait_job(job) == "COMPLETED"
        entries: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(entries) < 2:   # the epilog runs last
            entries = journal_entries(spark_stack, job)
            time.sleep(0.2)
        assert sorted(e["op"] for e in entries) == ["epilog", "prolog"]
        assert all(e["hook_exit"] == "fail_open" for e in entries)
    finally:
        spark_stack.set_hook_mode("fail_closed")
        spark_stack.start_daemon()
    records = spark_stack.wait_records(job, None, count=2)     # ingested after restart
    assert all(r.body.get("source") == "journal" for r in records)


def test_daemon_down_fail_closed_keeps_the_job_off_the_node(spark_stack: SparkStack) -> None:
    spark_stack.stop_daemon()
    job = ""
    try:
        nhc = _nhc(spark_stack, "1")
        assert nhc.returncode == 1 and "sparkd not answering" in nhc.stdout
        assert spark_stack.cluster.node_state().startswith("drain")
        spark_stack.cluster.wait_node_idle()                   # resume for the next part

        job = spark_stack.cluster.submit(["-J", "e2e-closed", "--gres=gpu:1,gpupower:300"],
                                         wrap="echo ran")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if spark_stack.cluster.node_state().startswith("drain"):
                break
            time.sleep(0.3)
        assert spark_stack.cluster.node_state().startswith("drain")
        # requeued and held (passing through COMPLETING while the epilog runs), never run
        state = spark_stack.cluster.wait_job(job, ("PENDING", "REQUEUE_HOLD"), timeout=30)
        assert state in ("PENDING", "REQUEUE_HOLD")
        assert "held" in field(spark_stack, job, "Reason").lower() or \
            field(spark_stack, job, "Priority") == "0"
        assert not (spark_stack.cluster.out_dir / f"{job}.out").exists() or \
            "ran" not in (spark_stack.cluster.out_dir / f"{job}.out").read_text()
        prologs = [e for e in journal_entries(spark_stack, job) if e["op"] == "prolog"]
        assert prologs and all(e["hook_exit"] == "fail_closed" for e in prologs)
    finally:
        if job:
            spark_stack.cluster.run(["scancel", job], check=False)
        spark_stack.start_daemon()
        spark_stack.cluster.wait_node_idle()
    ingested = spark_stack.wait_records(job, None)            # journaled prolog -> PER
    assert all(r.body.get("source") == "journal" for r in ingested)


def test_epilog_without_prolog_and_repeated_epilogs_are_harmless(
        spark_stack: SparkStack) -> None:
    env = dict(spark_stack.cluster.env, SLURM_JOB_ID="424242", SLURM_JOB_USER="root",
               SLURM_JOB_UID="0", SLURM_JOB_GID="0", SLURMD_NODENAME=spark_stack.cluster.node)
    epilog = spark_stack.root / "bin" / "epilog"
    before = spark_stack.limits_w()
    for _ in range(2):
        res = subprocess.run([str(epilog)], env=env, capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 0, res.stderr
    assert spark_stack.limits_w() == before
    journal = spark_stack.journal.read_text() if spark_stack.journal.exists() else ""
    assert '"job_id":"424242"' not in journal            # answered, not journaled
