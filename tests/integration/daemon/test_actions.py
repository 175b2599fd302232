"""Acceptance: each power action against a real sparkd produces the right PERs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spark_slurm.ledger import verify_ledger
from tests.integration.daemon.conftest import OTHER_UID, OWNER_UID, Sparkd

SPARKCTL = str(Path(sys.executable).parent / "sparkctl")


def _cap_records(sparkd: Sparkd, job_id: str) -> list[dict[str, Any]]:
    return [r for r in sparkd.records("cap") if r["body"].get("job_id") == job_id]


def test_prolog_allowed_records_every_path_and_sets_limits(sparkd: Sparkd) -> None:
    sparkd.add_job("101", gpus=[0, 1, 2, 3])
    sparkd.start()
    reply = sparkd.prolog("101", watts=2000, gpus=[0, 1, 2, 3])
    assert reply["ok"], reply
    assert reply["decision"]["action"] == "allow"
    assert [g["readback_mw"] for g in reply["gpus"]] == [500_000] * 4
    assert all(sparkd.limit_mw(g) == 500_000 for g in range(4))
    assert all(sparkd.limit_mw(g) == 1_000_000 for g in range(4, 8))
    (per,) = _cap_records(sparkd, "101")
    body = per["body"]
    assert per["seq"] == reply["seq"]
    assert body["authority"] == "slurm-prolog"
    assert body["requester"]["role"] == "scheduler"
    assert body["context"]["account"] == "physics"
    assert body["paths"] == {"telemetry": "ok", "context": "ok", "facility": "pending",
                             "policy": "allow", "ledger": "committed"}
    for entry in body["gpus"]:
        assert entry["previous_mw"] == 1_000_000
        assert entry["intended_mw"] == entry["readback_mw"] == 500_000 and entry["ok"]
        assert entry["before"]["enforced_mw"] == 1_000_000
        assert entry["before"]["power_mw"] > 0
    facility = sparkd.wait_record(
        lambda r: r["kind"] == "facility" and r["body"]["ref"]["seq"] == reply["seq"], 10,
        "facility follow-up")
    assert facility["body"]["verdict"] == "unavailable"  # no Karman stream configured
    assert facility["body"]["ref"]["hash"] == reply["hash"]


def test_prolog_clamped_to_tenant_limit(sparkd: Sparkd) -> None:
    sparkd.add_job("102", gpus=[0, 1])
    sparkd.start()
    reply = sparkd.prolog("102", watts=1600, gpus=[0, 1])  # 800 W/GPU asked
    assert reply["ok"]
    assert reply["decision"]["action"] == "clamp"
    assert reply["decision"]["granted_mw"] == 600_000
    assert reply["decision"]["rule"] == "tenant:physics"
    assert sparkd.limit_mw(0) == sparkd.limit_mw(1) == 600_000
    (per,) = _cap_records(sparkd, "102")
    assert per["body"]["decision"]["requested_mw"] == 800_000


def test_prolog_denied_leaves_limits_untouched(sparkd: Sparkd) -> None:
    sparkd.add_job("103", account="students", gpus=[0, 1])
    sparkd.start()
    reply = sparkd.prolog("103", watts=1000, gpus=[0, 1])  # 500 W/GPU > 350, deny
    assert not reply["ok"]
    assert reply["error"]["code"] == "denied"
    assert reply["decision"]["action"] == "deny"
    assert sparkd.limit_mw(0) == sparkd.limit_mw(1) == 1_000_000
    assert _cap_records(sparkd, "103") == []
    (reject,) = [r for r in sparkd.records("reject") if r["body"].get("job_id") == "103"]
    assert reject["seq"] == reply["seq"]
    assert reject["body"]["decision"]["rule"] == "tenant:students"
    assert reject["body"]["context"]["account"] == "students"


def test_owner_may_lower_but_not_raise_and_others_are_refused(sparkd: Sparkd) -> None:
    sparkd.add_job("104", uid=OWNER_UID, gpus=[2, 3])
    sparkd.start()
    assert sparkd.prolog("104", watts=1000, gpus=[2, 3])["ok"]  # 500 W/GPU

    lower = sparkd.request_as(OWNER_UID, {"op": "cap", "job_id": "104", "watts_per_gpu": 400,
                                          "reason": "saving energy"})
    assert lower["ok"], lower
    assert lower["decision"]["action"] == "allow"
    assert sparkd.limit_mw(2) == sparkd.limit_mw(3) == 400_000
    owner_cap = _cap_records(sparkd, "104")[-1]["body"]
    assert owner_cap["requester"] == {"uid": OWNER_UID, "user": str(OWNER_UID), "role": "owner"}
    assert owner_cap["authority"] == "job-owner"

    raise_ = sparkd.request_as(OWNER_UID, {"op": "cap", "job_id": "104", "watts_per_gpu": 550})
    assert not raise_["ok"]
    assert raise_["error"]["code"] == "denied"
    assert sparkd.limit_mw(2) == 400_000

    other = sparkd.request_as(OTHER_UID, {"op": "cap", "job_id": "104", "watts_per_gpu": 300,
                                          "uid": OWNER_UID, "user": "u4242"})
    assert not other["ok"]
    assert other["error"]["code"] == "forbidden"
    assert sparkd.limit_mw(2) == 400_000
    rejects = {r["seq"]: r["body"] for r in sparkd.records("reject")}
    assert rejects[raise_["seq"]]["decision"]["action"] == "deny"
    assert rejects[raise_["seq"]]["requester"]["role"] == "owner"
    forbidden = rejects[other["seq"]]
    assert forbidden["requester"]["uid"] == OTHER_UID  # the kernel's word, not the body's
    assert forbidden["request"]["uid"] == OWNER_UID  # what was claimed is kept too

    # prolog from a non-root peer is refused and recorded as well
    fake = sparkd.request_as(OTHER_UID, {"op": "prolog", "job_id": "104", "gpus": [2]})
    assert fake["error"]["code"] == "forbidden"
    assert sparkd.limit_mw(2) == 400_000


def test_silent_mismatch_is_flagged_at_readback(sparkd: Sparkd) -> None:
    sparkd.add_job("105", gpus=[5])
    sparkd.fleet.inject_fault(5, "silent-mismatch")
    sparkd.start()
    reply = sparkd.prolog("105", watts=450, gpus=[5])
    assert reply["ok"]
    (gpu,) = reply["gpus"]
    assert gpu["intended_mw"] == 450_000 and gpu["readback_mw"] != 450_000 and not gpu["ok"]
    (per,) = _cap_records(sparkd, "105")
    assert per["body"]["gpus"][0]["ok"] is False
    fault = sparkd.wait_record(lambda r: r["kind"] == "fault" and r["body"]["gpu"] == 5, 5,
                               "mismatch fault PER")
    assert "read-back mismatch" in fault["body"]["error"]


def test_out_of_band_limit_is_detected_and_reconciled(sparkd: Sparkd) -> None:
    sparkd.add_job("106", gpus=[6])
    sparkd.start()
    assert sparkd.prolog("106", watts=500, gpus=[6])["ok"]
    subprocess.run([SPARKCTL, "sim", "smi", str(sparkd.sim_dir), "-i", "6", "-pl", "900"],
                   check=True, capture_output=True)
    drift = sparkd.wait_record(lambda r: r["kind"] == "drift" and r["body"]["gpu"] == 6, 2.5,
                               "drift PER within 2 s")
    body = drift["body"]
    assert body["expected_mw"] == 500_000 and body["observed_mw"] == 900_000
    assert body["cause"] == "out-of-band"
    assert body["action"] == "reconcile"
    assert body["readback_mw"] == 500_000
    assert body["job_id"] == "106"
    assert sparkd.limit_mw(6) == 500_000


def test_driver_reload_is_told_apart(sparkd: Sparkd) -> None:
    sparkd.add_job("107", gpus=[1])
    sparkd.start()
    assert sparkd.prolog("107", watts=500, gpus=[1])["ok"]
    sparkd.fleet.inject_fault(1, "driver-reload")
    drift = sparkd.wait_record(lambda r: r["kind"] == "drift" and r["body"]["gpu"] == 1, 3,
                               "drift after a driver reload")
    assert drift["body"]["cause"] == "driver-reload"
    assert drift["body"]["energy_reset"] is True
    assert sparkd.limit_mw(1) == 500_000


def test_thermal_spike_throttles_then_releases(sparkd: Sparkd) -> None:
    sparkd.add_job("108", gpus=[7])
    sparkd.start()
    assert sparkd.prolog("108", watts=600, gpus=[7])["ok"]
    sparkd.fleet.inject_fault(7, "thermal-spike", 6)
    throttle = sparkd.wait_record(lambda r: r["kind"] == "throttle", 20, "thermal throttle")
    body = throttle["body"]
    assert body["gpu"] == 7 and body["authority"] == "automation:thermal"
    assert body["temp_mc"] >= 52_000 and body["from_mw"] == 600_000 and body["to_mw"] == 300_000
    release = sparkd.wait_record(lambda r: r["kind"] == "release", 40, "thermal release")
    assert release["body"]["ref"]["seq"] == throttle["seq"]
    assert release["body"]["temp_mc"] <= 45_000
    assert release["body"]["to_mw"] == 600_000
    assert sparkd.limit_mw(7) == 600_000
    assert not [r for r in sparkd.records("drift") if r["body"]["gpu"] == 7]
    follow = sparkd.wait_record(lambda r: r["kind"] == "facility"
                                and r["body"]["ref"]["seq"] == throttle["seq"], 10,
                                "facility follow-up of the throttle")
    assert follow["body"]["ref_kind"] == "throttle" and follow["body"]["gpus"] == [7]


def test_driver_crash_mid_job_records_fault_and_proves_ceiling(sparkd: Sparkd) -> None:
    sparkd.add_job("109", gpus=[4])
    sparkd.fleet.set_load(1.0, 4)
    sparkd.start()
    assert sparkd.prolog("109", watts=400, gpus=[4])["ok"]
    time.sleep(1.5)  # let power settle under the new cap before the driver goes away
    sparkd.fleet.inject_fault(4, "driver-crash", 1.5)
    fault = sparkd.wait_record(lambda r: r["kind"] == "fault" and r["body"]["gpu"] == 4, 5,
                               "fault PER")
    assert "GpuLost" in fault["body"]["error"]
    assert fault["body"]["expected_mw"] == 400_000
    recovery = sparkd.wait_record(lambda r: r["kind"] == "recovery", 10, "recovery PER")
    body = recovery["body"]
    assert body["ref"]["seq"] == fault["seq"]
    assert body["held"] is True
    assert body["enforced_mw"] == body["expected_mw"] == 400_000
    assert 0 < body["outage_avg_power_mw"] <= 400_000
    assert len([r for r in sparkd.records("fault") if r["body"]["gpu"] == 4]) == 1


def test_epilog_restores_previous_limit_with_energy(sparkd: Sparkd) -> None:
    sparkd.add_job("110", gpus=[0, 1])
    sparkd.fleet.oob_set_limit(1, 800_000)  # the limit before the job is not the default
    sparkd.start()
    sparkd.fleet.set_load(0.8)
    assert sparkd.prolog("110", watts=1000, gpus=[0, 1])["ok"]
    time.sleep(1.0)
    reply = sparkd.request({"op": "epilog", "job_id": "110", "user": "u4242", "uid": OWNER_UID})
    assert reply["ok"], reply
    assert sparkd.limit_mw(0) == 1_000_000 and sparkd.limit_mw(1) == 800_000
    (restore,) = [r for r in sparkd.records("restore") if r["body"].get("job_id") == "110"]
    body = restore["body"]
    assert body["authority"] == "slurm-epilog"
    by_gpu = {e["index"]: e for e in body["gpus"]}
    assert by_gpu[1]["intended_mw"] == by_gpu[1]["readback_mw"] == 800_000
    assert all(e["energy_mj"] > 300_000 and e["energy_reset"] is False for e in body["gpus"])
    assert body["energy_mj"] == sum(e["energy_mj"] for e in body["gpus"])
    again = sparkd.request({"op": "epilog", "job_id": "110"})  # repeated: harmless
    assert again["error"]["code"] == "already-restored" and "seq" in again  # recorded
    assert sparkd.limit_mw(1) == 800_000
    assert len([r for r in sparkd.records("restore") if r["body"].get("job_id") == "110"]) == 1
    assert sparkd.stop() == 0
    assert verify_ledger(sparkd.state_dir / "ledger.db").ok


def test_drift_policy_record_only_records_and_accepts(root: Path) -> None:
    sparkd = Sparkd(root, drift="record")
    try:
        sparkd.add_job("111", gpus=[3])
        sparkd.start()
        assert sparkd.prolog("111", watts=500, gpus=[3])["ok"]
        sparkd.fleet.oob_set_limit(3, 650_000)
        drift = sparkd.wait_record(lambda r: r["kind"] == "drift", 3, "drift PER")
        assert drift["body"]["action"] == "record" and "readback_mw" not in drift["body"]
        time.sleep(1.0)
        assert sparkd.limit_mw(3) == 650_000  # left as found
        assert len(sparkd.records("drift")) == 1  # recorded once, then accepted
        status = sparkd.request({"op": "status"})
        assert status["gpus"][3]["governed_mw"] == 650_000
    finally:
        sparkd.stop()
