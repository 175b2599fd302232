"""Validate-only mode against a real sparkd: an external executor (a separate process,
`sparkctl sim executor`) sets the limits, sparkd validates and records each verdict."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.ledger import verify_ledger
from tests.integration.daemon.conftest import OTHER_UID, OWNER_UID, Sparkd

SPARKCTL = str(Path(sys.executable).parent / "sparkctl")
EXECUTOR_UID = 4343  # a made-up service account listed in executors.users
VALIDATE_ALL = (f"executors:\n  validate_only: all\n  users: [{EXECUTOR_UID}]\n"
                "  deadline_s: 5\n  expect: dps\n")
W = 1000  # mW per W


@pytest.fixture
def validating(root: Path) -> Iterator[Sparkd]:
    daemon = Sparkd(root, extra_config=VALIDATE_ALL)
    try:
        yield daemon
    finally:
        daemon.stop()


def executor(sparkd: Sparkd, *args: str) -> dict[str, Any]:
    """Run the simulated executor as its own process, like DCGM or a site script."""
    out = subprocess.run([SPARKCTL, "sim", "executor", str(sparkd.sim_dir), "--socket",
                          str(sparkd.socket), "--json", *args],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def outcome(sparkd: Sparkd, verdict: str, timeout_s: float = 20) -> dict[str, Any]:
    return sparkd.wait_record(lambda r: r["kind"] == "executor"
                              and r["body"]["verdict"] == verdict, timeout_s,
                              f"an executor PER with verdict {verdict}")


def executor_records(sparkd: Sparkd) -> list[dict[str, Any]]:
    return sparkd.records("executor")


def test_an_announced_change_that_lands_is_validated_and_never_reset(
        validating: Sparkd) -> None:
    sparkd = validating
    sparkd.add_job("301", gpus=[0, 1])
    sparkd.start()
    result = executor(sparkd, "--job", "301", "--gpu", "0", "--gpu", "1", "--watts", "450",
                      "--name", "site-script", "--delay", "0.3")
    reply = result["reply"]
    assert reply["ok"] and reply["verdict"] == "approve", reply
    assert [a["new_mw"] for a in result["applied"]] == [450 * W, 450 * W]
    per = outcome(sparkd, "validated")
    body = per["body"]
    assert body["job_id"] == "301"
    assert body["executor"]["name"] == "site-script"
    assert body["executor"]["uid"] == 0 and body["executor"]["authority"] == "root"
    assert body["requester"]["role"] == "executor"
    assert body["paths"] == {"telemetry": "ok", "context": "ok", "facility": "pending",
                             "policy": "allow", "ledger": "committed"}
    assert [(g["index"], g["intended_mw"], g["readback_mw"], g["landed"], g["ok"])
            for g in body["gpus"]] == [(0, 450 * W, 450 * W, True, True),
                                       (1, 450 * W, 450 * W, True, True)]
    assert all(g["before"]["enforced_mw"] == 1_000_000 for g in body["gpus"])
    assert body["intent"]["id"] == reply["intent"]["id"]
    assert body["context"]["account"] == "physics"
    sparkd.wait_record(lambda r: r["kind"] == "facility" and r["body"]["ref"]["seq"]
                       == per["seq"], 15, "facility follow-up of the executor PER")
    time.sleep(1.0)  # several monitor periods: sparkd must not put anything back
    assert sparkd.limit_mw(0) == sparkd.limit_mw(1) == 450 * W
    assert sparkd.records("drift") == []
    assert [r["body"]["verdict"] for r in executor_records(sparkd)] == ["validated"]
    assert sparkd.stop() == 0
    assert verify_ledger(sparkd.state_dir / "ledger.db").ok


def test_applying_a_denied_intent_is_a_recorded_policy_violation(validating: Sparkd) -> None:
    sparkd = validating
    sparkd.add_job("302", gpus=[2])
    sparkd.start()
    # physics may have 600 W/GPU: 800 is denied, and the executor sets it anyway
    result = executor(sparkd, "--job", "302", "--gpu", "2", "--watts", "800",
                      "--ignore-deny")
    reply = result["reply"]
    assert not reply["ok"] and reply["verdict"] == "deny", reply
    assert reply["error"]["code"] == "denied" and "600" in reply["error"]["message"]
    reject = next(r for r in sparkd.records("reject") if r["seq"] == reply["seq"])
    assert reject["body"]["op"] == "intent"
    assert reject["body"]["decision"]["rule"] == "tenant:physics"
    per = outcome(sparkd, "denied-but-applied")
    body = per["body"]
    assert body["ref"] == {"seq": reply["seq"], "hash": reply["hash"]}
    assert body["paths"]["policy"] == "deny"
    assert body["gpus"][0]["readback_mw"] == 800 * W and body["gpus"][0]["landed"]
    assert sparkd.limit_mw(2) == 800 * W  # recorded, not undone: sparkd does not execute
    audit = subprocess.run([SPARKCTL, "audit", "302", "--db", str(sparkd.state_dir /
                            "ledger.db"), "--json"], capture_output=True, text=True,
                           timeout=120, check=False)
    assert audit.returncode == 1, audit.stderr  # a policy violation is not validated
    problems = json.loads(audit.stdout)["verdict"]["problems"]
    assert any(f"seq {per['seq']} (executor) not validated" in p
               and "verdict=denied-but-applied" in p for p in problems), problems

    # an obedient executor that is denied changes nothing, and nothing more is recorded
    obeyed = executor(sparkd, "--job", "302", "--gpu", "2", "--watts", "900")
    assert obeyed["applied"] == [] and obeyed["reply"]["verdict"] == "deny"
    time.sleep(5.5)  # past the 5 s deadline
    assert [r["body"]["verdict"] for r in executor_records(sparkd)] == ["denied-but-applied"]


def test_a_change_nobody_announced_is_applied_without_intent(validating: Sparkd) -> None:
    sparkd = validating
    sparkd.start()
    result = executor(sparkd, "--gpu", "3", "--watts", "350", "--no-announce")
    assert result["reply"] is None and result["applied"]
    per = outcome(sparkd, "applied-without-intent")
    body = per["body"]
    assert "job_id" not in body  # no job holds GPU 3: judged by site-wide limits
    assert body["context"]["status"] == "partial"
    assert body["cause"] == "out-of-band"
    assert body["authority"] == "automation:drift"
    assert "executor" not in body
    assert body["gpus"][0]["previous_mw"] == 1_000_000
    assert body["gpus"][0]["readback_mw"] == 350 * W
    assert body["decision"]["action"] == "allow"  # the policy would have allowed 350 W
    assert sparkd.limit_mw(3) == 350 * W
    # an executor that announces one value and sets another: the set is unannounced
    # and the announced intent expires
    executor(sparkd, "--gpu", "4", "--watts", "400", "--apply-watts", "420",
             "--deadline", "1")
    second = sparkd.wait_record(lambda r: r["kind"] == "executor"
                                and r["body"]["gpus"][0]["index"] == 4
                                and r["body"]["verdict"] == "applied-without-intent", 15,
                                "the mismatched set")
    assert second["body"]["pending_intents"]
    expired = outcome(sparkd, "intent-expired")
    assert expired["body"]["gpus"][0]["landed"] is False
    assert expired["body"]["gpus"][0]["readback_mw"] == 420 * W
    assert expired["body"]["paths"]["telemetry"] == "failed"


def test_an_approved_intent_that_never_lands_expires(validating: Sparkd) -> None:
    sparkd = validating
    sparkd.start()
    result = executor(sparkd, "--gpu", "5", "--watts", "300", "--no-apply",
                      "--deadline", "1", "--name", "dcgm")
    assert result["reply"]["verdict"] == "approve" and result["applied"] == []
    per = outcome(sparkd, "intent-expired")
    body = per["body"]
    assert body["executor"]["name"] == "dcgm"
    assert body["gpus"][0]["landed"] is False and body["gpus"][0]["ok"] is False
    assert body["gpus"][0]["readback_mw"] == 1_000_000
    assert body["intent"]["deadline_ns"] <= per["body"]["changed_ns"]


def test_prolog_and_epilog_expect_the_executor_and_sparkd_sets_nothing(
        validating: Sparkd) -> None:
    sparkd = validating
    sparkd.add_job("304", gpus=[6, 7])
    sparkd.start()
    reply = sparkd.prolog("304", watts=1200, gpus=[6, 7])  # 600 W/GPU granted
    assert reply["ok"], reply
    assert [g["expected_mw"] for g in reply["gpus"]] == [600 * W, 600 * W]
    assert sparkd.limit_mw(6) == sparkd.limit_mw(7) == 1_000_000  # sparkd set nothing
    cap = next(r for r in sparkd.records("cap") if r["seq"] == reply["seq"])
    assert cap["body"]["expectation"]["executor"] == "dps"
    # the executor (DPS, say) announces what the prolog expects, then applies it
    result = executor(sparkd, "--job", "304", "--gpu", "6", "--gpu", "7", "--watts", "600",
                      "--name", "dps")
    assert result["reply"]["intent"]["id"] == cap["body"]["expectation"]["id"]
    per = outcome(sparkd, "validated")
    assert per["body"]["ref"] == {"seq": reply["seq"], "hash": reply["hash"]}
    assert per["body"]["executor"]["name"] == "dps"
    assert per["body"]["executor"]["expected_by"] == "prolog"
    assert per["body"]["intent"]["source"] == "prolog"
    # sparkctl cap cannot act on a validate-only GPU
    refused = sparkd.request({"op": "cap", "job_id": "304", "watts_per_gpu": 500})
    assert refused["error"]["code"] == "denied" and "validate-only" in \
        refused["error"]["message"]
    # epilog: the executor must put back what was there before the job (1000 W)
    end = sparkd.request({"op": "epilog", "job_id": "304"})
    assert end["ok"] and [g["expected_mw"] for g in end["gpus"]] == [1_000_000] * 2
    executor(sparkd, "--gpu", "6", "--gpu", "7", "--watts", "1000", "--no-announce")
    restored = sparkd.wait_record(lambda r: r["kind"] == "executor" and r["body"].get("ref", {})
                                  .get("seq") == end["seq"], 15, "the epilog's expectation")
    assert restored["body"]["verdict"] == "validated"
    assert restored["body"]["executor"] == {"name": "dps", "expected_by": "epilog"}
    # replay from the ledger alone sees what the executor set, not what sparkd expected
    replay = subprocess.run([SPARKCTL, "replay", "--db", str(sparkd.state_dir / "ledger.db"),
                             "--at", str(time.time_ns()), "--json"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert replay.returncode == 0, replay.stderr
    gpus = {g["gpu"]: g for g in json.loads(replay.stdout)["gpus"]}
    assert gpus[6]["limit_mw"] == 1_000_000 and gpus[6]["per"]["kind"] == "executor"


def test_who_may_announce_comes_from_the_kernel(validating: Sparkd) -> None:
    sparkd = validating
    sparkd.start()
    intent = {"op": "intent", "gpus": [1], "watts_per_gpu": 500, "executor": "dcgm",
              "uid": 0, "user": "root"}  # claimed identity: ignored
    refused = sparkd.request_as(OTHER_UID, intent)
    assert refused["error"]["code"] == "forbidden", refused
    reject = next(r for r in sparkd.records("reject") if r["seq"] == refused["seq"])
    assert reject["body"]["requester"]["uid"] == OTHER_UID
    assert reject["body"]["requester"]["role"] == "executor"
    allowed = sparkd.request_as(EXECUTOR_UID, intent)
    assert allowed["ok"] and allowed["verdict"] == "approve", allowed
    assert sparkd.request_as(OWNER_UID, intent)["error"]["code"] == "forbidden"
    # the documented CLI: exit 0 approve (go ahead), exit 1 deny, one line either way
    cli = [SPARKCTL, "intent", "--gpu", "2", "--executor", "site-script", "--socket",
           str(sparkd.socket)]
    ok = subprocess.run([*cli, "--watts", "500"], capture_output=True, text=True, timeout=60,
                        check=False)
    assert ok.returncode == 0 and "approved intent" in ok.stdout, ok.stderr
    no = subprocess.run([*cli, "--watts", "900"], capture_output=True, text=True, timeout=60,
                        check=False)
    assert no.returncode == 1 and no.stdout == ""
    assert no.stderr.startswith("sparkctl: daemon refused the request (denied): policy rule "
                                "gpu-limits"), no.stderr


def test_a_pending_intent_survives_a_restart_and_lands_while_sparkd_is_down(
        root: Path) -> None:
    sparkd = Sparkd(root, extra_config=VALIDATE_ALL.replace("deadline_s: 5",
                                                            "deadline_s: 120"))
    try:
        sparkd.start()
        result = executor(sparkd, "--gpu", "0", "--watts", "500", "--no-apply")
        assert result["reply"]["verdict"] == "approve"
        assert sparkd.stop() == 0
        sparkd.fleet.oob_set_limit(0, 500 * W)  # the executor acts while sparkd is down
        sparkd.fleet.oob_set_limit(1, 250 * W)  # and something else changes GPU 1
        sparkd.start()
        per = outcome(sparkd, "validated")
        assert per["body"]["intent"]["id"] == result["reply"]["intent"]["id"]
        blind = outcome(sparkd, "applied-without-intent")
        assert blind["body"]["gpus"][0]["index"] == 1
        assert sparkd.limit_mw(0) == 500 * W and sparkd.limit_mw(1) == 250 * W
        reconcile = sparkd.records("reconcile")[-1]["body"]
        assert {e["index"]: e["action"] for e in reconcile["gpus"]}[1] == "observe"
    finally:
        sparkd.stop()


def test_a_validated_executor_action_travels_as_an_evidence_bundle(root: Path) -> None:
    """The real power action's PERs (cap, executor verdict, restore), witnessed, bundled
    and checked offline by the shell verifier with only the witness key pinned."""
    sparkd = Sparkd(root, keys=True, extra_config=VALIDATE_ALL)
    try:
        sparkd.add_job("305", gpus=[0])
        sparkd.start()
        assert sparkd.prolog("305", watts=500, gpus=[0])["ok"]
        executor(sparkd, "--job", "305", "--gpu", "0", "--watts", "500", "--name", "dcgm")
        outcome(sparkd, "validated")
        assert sparkd.request({"op": "epilog", "job_id": "305"})["ok"]
        executor(sparkd, "--job", "305", "--gpu", "0", "--watts", "1000", "--no-announce")
        sparkd.wait_record(lambda r: r["kind"] == "executor"
                           and r["body"]["intent"]["source"] == "epilog", 15,
                           "the epilog's validated restore")
        assert sparkd.stop() == 0  # the shutdown checkpoint covers every record
    finally:
        sparkd.stop()
    assert sparkd.keys is not None
    trust = root / "trust"
    trust.mkdir()
    (trust / "n1.pub").write_bytes(sparkd.keys.public_key.read_bytes())
    ledger = sparkd.state_dir / "ledger.db"
    state = root / "witness"
    checkpoint = root / "n1.checkpoint"
    run = subprocess.run([SPARKCTL, "ledger", "checkpoint", str(ledger)], capture_output=True,
                         text=True, timeout=60, check=True)
    checkpoint.write_text(run.stdout)
    subprocess.run([SPARKCTL, "witness", "--state", str(state), "--keys", str(trust),
                    str(checkpoint)], capture_output=True, timeout=60, check=True)
    bundle = root / "job305.evidence"
    made = subprocess.run([SPARKCTL, "evidence", "305", "--db", str(ledger), "--out",
                           str(bundle), "--witness-state", str(state), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    kinds = json.loads(made.stdout)["kinds"]
    assert kinds["executor"] == 2 and kinds["cap"] == 1 and kinds["restore"] == 1
    assert kinds["policy"] == 1
    script = Path(__file__).resolve().parents[3] / "contrib" / "verify-evidence.sh"
    check = subprocess.run(["bash", str(script), "--witness-pub", str(state / "witness.pub"),
                            str(bundle)], capture_output=True, text=True, timeout=240,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok, job 305" in check.stdout
