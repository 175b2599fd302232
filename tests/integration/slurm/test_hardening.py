"""Issue 19 on a real cluster: no user can drain the node, and every failure leaves a record.

One stack of its own (slurmctld, slurmd, job_submit.lua, the hook, sparkd), with
sparkd's state, ledger and the hook's journal on a small tmpfs so the disk can
really fill. The connection hog runs as `nobody` in its own process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.hog import start_hog
from spark_slurm.demo.cluster import FINAL_STATES, free_port
from tests.integration.slurm.conftest import require_slurm
from tests.integration.slurm.stack import SparkStack
from tests.integration.tmpfs import fill, small_tmpfs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NOBODY = 65534
DEFAULT_W = 1000


@pytest.fixture(scope="module")
def stack() -> Iterator[SparkStack]:
    require_slurm()
    # not under pytest's 0700 temp root: `nobody` must be able to reach the socket
    root = Path(tempfile.mkdtemp(prefix="spark-hardening-"))
    root.chmod(0o755)
    try:
        with small_tmpfs(root / "spark", 48 * 1024):
            s = SparkStack(root, daemon_extra={
                "metrics": {"address": "127.0.0.1", "port": free_port()},
                "disk": {"min_free_mb": 8, "reserve_kb": 256},
                "automations": {"maintain_period_s": 2}})
            s.start()
            try:
                yield s
            finally:
                s.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def status(stack: SparkStack) -> dict[str, Any]:
    from spark_slurm.daemon import client  # noqa: PLC0415

    return client.request({"op": "status"}, stack.socket, timeout_s=20)


def metric(stack: SparkStack, name: str) -> float:
    port = status(stack)["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
               if line.startswith(name + "{"))


def node_reason(stack: SparkStack) -> str:
    res = stack.cluster.run(["sinfo", "-h", "-n", stack.cluster.node, "-o", "%E"])
    return res.stdout.strip()


def wait_node(stack: SparkStack, want: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = stack.cluster.node_state()
        if state.startswith(want):
            return state
        time.sleep(0.3)
    raise AssertionError(f"node {state!r} (reason {node_reason(stack)!r}), not {want!r}:\n"
                         f"{stack.log_tail(30)}")


def finish(stack: SparkStack, job: str, states: list[str], timeout: float = 90) -> str:
    """Wait for a job to end, noting every node state seen meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states.append(stack.cluster.node_state())
        state = stack.cluster.job_state(job)
        if state in FINAL_STATES or "HOLD" in state:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job} still {stack.cluster.job_state(job)}")


def nhc(stack: SparkStack) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(stack.nhc)], env=dict(stack.cluster.env, SPARK_NHC_DRAIN="1"),
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_1000_connection_hog_as_a_user_never_drains_the_node(stack: SparkStack) -> None:
    hog = start_hog(stack.socket, NOBODY, 1000, 60)
    seen_states: list[str] = []
    jobs = []
    try:
        deadline = time.monotonic() + 30
        while metric(stack, "spark_connections_refused_total") < 1000:
            assert time.monotonic() < deadline and hog.poll() is None, hog.communicate()
            time.sleep(0.2)
        for i in range(6):  # root's jobs start and end while the hog hammers the socket
            job = stack.cluster.submit(["-J", f"hog-{i}", "--gres=gpu:2,gpupower:600"],
                                       wrap="sleep 1")
            jobs.append(job)
            assert finish(stack, job, seen_states) == "COMPLETED", stack.cluster.log_tails()
    finally:
        hog.kill()
        hog.communicate(timeout=30)
    assert not any(s.startswith(("drain", "down")) for s in seen_states), set(seen_states)
    assert stack.cluster.node_state() == "idle"
    for job in jobs:  # every job got its cap and its restore, each a PER
        [cap] = stack.wait_records(job, "cap")
        assert cap.body["decision"]["granted_mw"] == 300_000
        assert all(g["readback_mw"] == 300_000 for g in cap.body["gpus"])
        stack.wait_records(job, "restore")
        assert [r.kind for r in stack.records(job) if r.kind == "restore"] == ["restore"]
    journal = stack.journal.read_text() if stack.journal.exists() else ""
    assert not any(f'"job_id":"{j}"' in journal for j in jobs)  # answered, never journaled
    refused = metric(stack, "spark_connections_refused_total")
    assert refused > 1000
    summaries = [r.body for r in stack.records() if r.kind == "reject"
                 and r.body.get("requester", {}).get("uid") == NOBODY]
    assert 0 < len(summaries) < 60 < refused  # counted as nobody's, not one PER each
    assert all(b["code"] == "busy" for b in summaries)


def test_disk_full_drains_with_a_reason_first_then_catches_up_and_resumes(
        stack: SparkStack) -> None:
    mount = stack.state_dir
    long_job = stack.cluster.submit(["-J", "disk-long", "--gres=gpu:2,gpupower:800"],
                                    wrap="sleep 120")
    stack.wait_running(long_job)
    stack.wait_records(long_job, "cap")
    pending = ""
    try:
        # low: sparkd says so, and the shipped health check drains the node with why
        fill(mount, leave_kib=2048, name="filler-low")
        deadline = time.monotonic() + 30
        while status(stack)["healthy"]:
            assert time.monotonic() < deadline, "low space never reported"
            time.sleep(0.3)
        check = nhc(stack)
        assert check.returncode == 1 and "disk low" in check.stdout, check
        wait_node(stack, "drain")
        assert node_reason(stack).startswith("spark: sparkd unhealthy: disk low")
        pending = stack.cluster.submit(["-J", "disk-pending", "--gres=gpu:1,gpupower:300"],
                                       wrap="true")
        time.sleep(3)
        assert stack.cluster.job_state(pending) == "PENDING"   # kept off, not failed

        # full: a write fails; the job's end restores its GPUs and lands in the reserve
        fill(mount, leave_kib=0, name="filler-full")
        for i in range(400):
            reply = _cap(stack, long_job, 300 + i % 50)
            if not reply["ok"]:
                break
        assert reply["error"]["code"] == "disk-full", reply
        assert status(stack)["disk"]["full"] and metric(stack, "spark_disk_full") == 1
        stack.cluster.run(["scancel", long_job])
        stack.wait_limits({i: DEFAULT_W for i in range(8)})
        reserve = Path(str(stack.journal) + ".reserve")
        deadline = time.monotonic() + 60
        while f'"job_id":"{long_job}"'.encode() not in reserve.read_bytes():
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(0.3)
    finally:
        for name in ("filler-full", "filler-low"):
            (mount / name).unlink(missing_ok=True)
    # space is back: everything journaled is ingested, the node resumed, jobs run again
    wait_node(stack, "idle", timeout=90)
    restores = [r for r in stack.wait_records(long_job, "restore")]
    assert len(restores) == 1 and restores[0].body["source"] == "journal"
    resumed = [r.body for r in stack.records() if r.kind == "node"]
    assert resumed and resumed[-1]["event"] == "resume"
    assert stack.cluster.wait_job(pending, timeout=90) == "COMPLETED"
    stack.wait_records(pending, "restore")
    verify = subprocess.run([str(Path(sys.executable).parent / "sparkctl"), "verify",
                             str(stack.ledger)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _cap(stack: SparkStack, job: str, watts: int) -> dict[str, Any]:
    from spark_slurm.daemon import client  # noqa: PLC0415

    return client.request({"op": "cap", "job_id": job, "watts_per_gpu": watts}, stack.socket,
                          timeout_s=20)


def test_an_admins_drain_is_left_alone_and_a_prolog_error_of_ours_is_resumed(
        stack: SparkStack) -> None:
    node = stack.cluster.node
    stack.cluster.run(["scontrol", "update", f"nodename={node}", "state=drain",
                       "reason=maintenance window"])
    stack.stop_daemon()
    stack.start_daemon()  # sparkd checks the node at start
    deadline = time.monotonic() + 30
    while "not ours, left alone" not in stack.log_tail(50):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.3)
    assert stack.cluster.node_state().startswith("drain")
    assert node_reason(stack) == "maintenance window"
    stack.cluster.run(["scontrol", "update", f"nodename={node}", "state=resume"])
    wait_node(stack, "idle")

    # sparkd down under fail_closed: the prolog fails, slurmctld drains "Prolog error"
    stack.stop_daemon()
    job = stack.cluster.submit(["-J", "prolog-error", "--gres=gpu:1,gpupower:300"],
                               wrap="true")
    try:
        wait_node(stack, "drain")
        assert node_reason(stack) == "Prolog error"
    finally:
        stack.start_daemon()
    wait_node(stack, "idle")  # the journal shows our hook failed: so the drain was ours
    body = [r.body for r in stack.records() if r.kind == "node"][-1]
    assert body["reason"] == "Prolog error" and "spark-hook" in body["why"]
    rejected = [r.body for r in stack.records(job) if r.kind == "reject"]
    assert any(b["code"] == "failed-closed" for b in rejected), rejected
    stack.cluster.run(["scancel", job], check=False)

