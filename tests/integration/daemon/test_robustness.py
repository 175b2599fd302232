"""Bad input never crashes sparkd; every refusal is a PER; bad config and policy are refused."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from spark_slurm.cli import cli, run
from spark_slurm.ledger import verify_ledger
from spark_slurm.ledger.keys import load_hmac_key, load_public_key, signing_key_id
from tests.integration.daemon.conftest import OWNER_UID, Sparkd, _wait

SPARKD = str(Path(sys.executable).parent / "sparkd")


def test_malformed_oversized_and_unknown_requests_are_rejected_and_recorded(
        sparkd: Sparkd) -> None:
    sparkd.add_job("201", gpus=[0])
    sparkd.start()
    bad = [
        b"{not json\n",
        b"[1, 2]\n",
        b'{"op": "reboot"}\n',
        b'{"op": "prolog", "job_id": "201", "gpus": "0"}\n',
        b'{"op": "cap", "job_id": "201", "watts_per_gpu": "lots"}\n',
        b'{"op": "prolog", "job_id": "201", "surprise": 1}\n',
        b'{"op": "prolog", "job_id": "201", "watts": NaN}\n',
        b"\xff\xfe\n",
    ]
    seqs = []
    for line in bad:
        reply = sparkd.request(line)
        assert reply["ok"] is False, line
        assert reply["error"]["code"] == "bad-request", (line, reply)
        assert reply["error"]["message"]
        seqs.append(reply["seq"])
    huge = b'{"op": "status", "pad": "' + b"x" * 70_000 + b'"}\n'
    reply = sparkd.request(huge)
    assert reply["error"]["code"] == "bad-request"
    assert "exceeds 65536 bytes" in reply["error"]["message"]
    seqs.append(reply["seq"])
    # a connection that sends half a request and hangs up is simply dropped
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sparkd.socket))
        s.sendall(b'{"op": "pro')
    rejects = {r["seq"]: r["body"] for r in sparkd.records("reject")}
    assert set(seqs) <= set(rejects)
    assert "unknown op 'reboot'" in rejects[seqs[2]]["reason"]
    assert "'gpus'" in rejects[seqs[3]]["reason"]
    # the daemon is still fine and nothing changed on the GPUs
    assert sparkd.request({"op": "status"})["ok"]
    assert sparkd.limit_mw(0) == 1_000_000
    assert sparkd.prolog("201", watts=400, gpus=[0])["ok"]


def test_a_user_flooding_refused_requests_is_rate_limited_and_still_accounted(
        sparkd: Sparkd) -> None:
    sparkd.config.write_text(sparkd.config.read_text()
                             + "refusal_limit: {rate_per_s: 0.01, burst: 10}\n")
    sparkd.add_job("201", gpus=[0])
    sparkd.start()
    # one connection, 40 requests: alternately junk and a prolog (forbidden to a user)
    replies = sparkd.send_as(OWNER_UID, ["{not json",
                                         '{"op": "prolog", "job_id": "201", "gpus": [0]}'] * 20)
    codes = [r["error"]["code"] for r in replies]
    assert codes[:10] == ["bad-request", "forbidden"] * 5
    assert all("seq" in r for r in replies[:10])
    assert codes[10:] == ["rate-limited"] * 30
    assert all("seq" not in r for r in replies[10:])
    assert "retry in" in replies[10]["error"]["message"]
    # root (the scheduler) is never limited, and the GPUs were never touched
    assert sparkd.request(b"{junk\n")["error"]["code"] == "bad-request"
    assert sparkd.prolog("201", watts=400, gpus=[0])["ok"]
    # the 30 unrecorded requests become one counted reject PER at the next flush
    summary = sparkd.wait_record(lambda r: r["kind"] == "reject"
                                 and r["body"].get("code") == "rate-limited", 15,
                                 "rate-limited summary PER")["body"]
    assert summary["requester"]["uid"] == OWNER_UID
    assert summary["suppressed"]["count"] == 30
    assert summary["suppressed"]["ops"] == {"prolog": 15, "unknown": 15}
    assert summary["suppressed"]["first_ns"] <= summary["suppressed"]["last_ns"]
    own = [r for r in sparkd.records("reject") if r["body"]["requester"]["uid"] == OWNER_UID]
    assert len(own) == 10 + 1  # every request accounted for: 10 one by one, 30 counted
    port = json.loads(CliRunner().invoke(
        cli, ["status", "--json", "--socket", str(sparkd.socket)]).output)["metrics_port"]
    text = sparkd.scrape(port)
    assert 'spark_requests_rate_limited_total{node="n1"} 30.0' in text
    assert sparkd.stop() == 0


def test_unknown_gpu_and_missing_job_are_clear_refusals(sparkd: Sparkd) -> None:
    sparkd.start()
    reply = sparkd.prolog("202", gpus=[9], watts=400)
    assert reply["error"]["code"] == "bad-request"
    assert "GPU index 9 does not exist" in reply["error"]["message"]
    reply = sparkd.request({"op": "cap", "job_id": "999", "watts_per_gpu": 300})
    assert reply["error"]["code"] == "not-found"


def test_bad_config_and_bad_policy_refuse_to_start(root: Path) -> None:
    config = root / "bad.yaml"
    config.write_text("node: n1\nsocket: {path: /tmp/x.sock}\ngpu: {backend: quantum}\n"
                      "policy: p.yaml\n")
    out = subprocess.run([SPARKD, "--config", str(config)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"sparkd: {config}:3:16: gpu.backend: unknown backend "
                                  "'quantum' (sim, nvml, or none for a host without GPUs)")
    daemon = Sparkd(root / "d")
    daemon.policy.write_text("version: 1\ngpu:\n  max_watts: lots\n")
    out = subprocess.run([SPARKD, "--config", str(daemon.config)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith(f"sparkd: {daemon.policy}:3:")
    assert "Traceback" not in out.stderr
    assert not daemon.socket.exists()


def test_sighup_keeps_last_good_policy_and_records_a_new_one(sparkd: Sparkd) -> None:
    sparkd.start()
    policies = sparkd.records("policy")
    assert len(policies) == 1
    first = policies[0]["body"]["sha256"]
    good = sparkd.policy.read_text()
    sparkd.policy.write_text("version: 1\nrules: [[[\n")
    assert sparkd.proc is not None
    sparkd.proc.send_signal(signal.SIGHUP)
    _wait(lambda: "policy reload refused" in sparkd.log_text(), 10, "reload refusal logged")
    assert sparkd.request({"op": "status"})["policy"]["sha256"] == first
    sparkd.policy.write_text(good.replace("max_watts: 700", "max_watts: 650"))
    sparkd.proc.send_signal(signal.SIGHUP)
    _wait(lambda: len(sparkd.records("policy")) == 2, 10, "new policy PER")
    second = sparkd.records("policy")[1]["body"]
    assert second["sha256"] != first and "max_watts: 650" in second["text"]
    assert sparkd.request({"op": "status"})["policy"]["sha256"] == second["sha256"]
    # a restart with the same policy records nothing new
    assert sparkd.stop() == 0
    sparkd.start()
    assert len(sparkd.records("policy")) == 2


def test_journal_and_spool_are_ingested_once(sparkd: Sparkd) -> None:
    sparkd.add_job("301", gpus=[0, 1])  # still running: its journaled prolog applies
    lines = [
        {"op": "prolog", "job_id": "301", "user": "u4242", "uid": 4242, "partition": "gpu",
         "gpus": [0, 1], "watts": 800, "journaled_ns": 1, "hook_exit": "fail_open",
         "error": "connection refused"},
        {"op": "prolog", "job_id": "302", "user": "u4242", "uid": 4242, "partition": "gpu",
         "gpus": [2], "watts": 300, "journaled_ns": 2, "hook_exit": "fail_open",
         "error": "connection refused"},
        {"op": "epilog", "job_id": "302", "user": "u4242", "uid": 4242, "gpus": [2],
         "journaled_ns": 3, "hook_exit": "fail_open", "error": "connection refused"},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + "this is not json\n"
    sparkd.journal.write_text(text + '{"op": "epilog", "job_id": "3')  # torn last line
    denial = {"v": 1, "time_ns": 5, "decision": "deny", "rule": "tenant:students",
              "reason": "500 W/GPU above 350", "user_id": 4242, "user": "u4242",
              "account": "students", "partition": "gpu", "job_name": "train",
              "request": {"gpus": 2, "watts": 1000, "tres_per_node": "gres/gpu:2"},
              "comment": "", "policy_sha256": "ab" * 32}
    sparkd.spool.write_text(json.dumps(denial) + "\n{broken\n")
    sparkd.start()
    journal = [r for r in sparkd.records() if r["body"].get("source") == "journal"]
    kinds = [(r["kind"], r["body"].get("job_id")) for r in journal]
    assert kinds == [("cap", "301"), ("reject", "302"), ("restore", "302"), ("reject", None)]
    assert journal[0]["body"]["journal"]["hook_exit"] == "fail_open"
    assert journal[0]["body"]["authority"] == "journal"
    assert "no cap applied" in journal[1]["body"]["reason"]
    assert "malformed journal line" in journal[3]["body"]["reason"]
    assert sparkd.limit_mw(0) == 400_000 and sparkd.limit_mw(2) == 1_000_000
    spool = [r for r in sparkd.records() if r["body"].get("source") == "spool"]
    assert [r["kind"] for r in spool] == ["admission", "reject"]
    assert spool[0]["body"]["decision"] == "deny"
    assert spool[0]["body"]["context"]["account"] == "students"
    assert "byte" in spool[1]["body"]["reason"]
    # finish the torn line; `ingest` (or sparkd's own poll of the journal, whichever
    # comes first) picks it up, and nothing is read twice
    with sparkd.journal.open("a") as fh:
        fh.write('01", "gpus": [0, 1]}\n')
    reply = sparkd.request({"op": "ingest"})
    # sparkd also watches the journal while it runs, so it may have read the line first
    assert reply["ok"] and reply["ingested"]["spool"] == 0
    assert reply["ingested"]["journal"] in (0, 1)
    late = [r for r in sparkd.records("restore") if r["body"].get("job_id") == "301"]
    assert len(late) == 1 and late[0]["body"]["source"] == "journal"
    assert sparkd.limit_mw(0) == 1_000_000
    count = len(sparkd.records())
    assert sparkd.stop() == 0
    sparkd.start()
    new = [r for r in sparkd.records()[count:] if r["body"].get("source") in ("journal",
                                                                            "spool")]
    assert new == []


def test_status_cli_cap_cli_and_metrics(sparkd: Sparkd) -> None:
    sparkd.add_job("401", gpus=[3])
    sparkd.start()
    assert sparkd.prolog("401", watts=500, gpus=[3])["ok"]
    runner = CliRunner()
    result = runner.invoke(cli, ["status", "--json", "--socket", str(sparkd.socket)])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["jobs"][0]["job_id"] == "401"
    assert status["gpus"][3]["governed_mw"] == 500_000
    assert status["ledger"]["seq"] >= 3
    result = runner.invoke(cli, ["status", "--socket", str(sparkd.socket)])
    assert result.exit_code == 0 and "1 job(s) governed: 401" in result.output
    result = runner.invoke(cli, ["cap", "--job", "401", "--watts", "450", "--socket",
                                 str(sparkd.socket)])
    assert result.exit_code == 0, result.output
    assert "allow" in result.output and sparkd.limit_mw(3) == 450_000
    assert run(["cap", "--job", "nope", "--watts", "450", "--socket",
                str(sparkd.socket)]) == 1
    assert run(["status", "--socket", str(sparkd.root / "missing.sock")]) == 1
    port = status["metrics_port"]
    time.sleep(0.6)
    text = sparkd.scrape(port)
    assert 'spark_gpu_power_limit_watts{gpu="3",node="n1"} 450.0' in text
    assert 'spark_pers_total{decision="allow",kind="cap",node="n1"}' in text
    assert "spark_validation_seconds_bucket" in text
    assert "spark_ledger_head_seq" in text


def test_sparkctl_daemon_refuses_a_bad_config(root: Path) -> None:
    config = root / "sparkd.yaml"
    config.write_text("policy: p.yaml\ngpu: {backend: sim}\n")
    result = CliRunner().invoke(cli, ["daemon", "--config", str(config)])
    assert result.exit_code != 0
    assert run(["daemon", "--config", str(config)]) == 2


def test_root_rotates_the_signing_key_through_the_daemon(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = Sparkd(root, keys=True)
    assert daemon.keys is not None
    old_pub = load_public_key(daemon.keys.public_key)
    try:
        daemon.start()
        user = daemon.request_as(OWNER_UID, {"op": "rotate-key"})
        assert user["error"]["code"] == "forbidden" and "seq" in user
        assert run(["ledger", "rotate-key", "--socket", str(daemon.socket)]) == 0
        out = capsys.readouterr().out
        assert "signing key " in out and f"new public key: {daemon.keys.public_key}" in out
        new_pub = load_public_key(daemon.keys.public_key)
        assert new_pub.public_bytes_raw() != old_pub.public_bytes_raw()
        rotation = [r for r in daemon.records("key") if r["body"].get("event") == "rotate"]
        assert len(rotation) == 1
        assert rotation[0]["body"]["key_id"] == signing_key_id(new_pub)
        assert daemon.stop() == 0
        daemon.start()  # the replaced key file is the ledger's current key
        daemon.add_job("201", gpus=[0])
        assert daemon.prolog("201", watts=400, gpus=[0])["ok"]  # commits under the new key
        assert daemon.stop() == 0
        k0 = load_hmac_key(daemon.keys.hmac_key)
        report = verify_ledger(daemon.state_dir / "ledger.db", k0, public_key=old_pub)
        assert report.ok, report.reason
        assert report.signing_keys == (signing_key_id(old_pub), signing_key_id(new_pub))
    finally:
        with contextlib.suppress(Exception):
            daemon.stop()
