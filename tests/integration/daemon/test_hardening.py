"""Issue 19 against a real sparkd: a connection hog as another uid, the file modes
whatever the umask, `status` per caller, and one restore per job end across kill -9."""

from __future__ import annotations

import json
import re
import resource
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.hog import start_hog
from tests.integration.daemon.conftest import OTHER_UID, OWNER_UID, Sparkd, _wait
from tests.integration.daemon.test_hook import _hook

HOOK = str(Path(sys.executable).parent / "spark-hook")

def metrics(sparkd: Sparkd) -> str:
    return sparkd.scrape()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_connection_hog_cannot_keep_the_scheduler_or_other_users_out(
        sparkd: Sparkd) -> None:
    sparkd.config.write_text(sparkd.config.read_text() + (
        "connections: {max: 64, reserved: 8, per_uid: 4, rate_per_s: 5, burst: 10, "
        "idle_timeout_s: 2}\n"))
    for g in range(8):
        sparkd.add_job(f"90{g}", gpus=[g])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what sparkd inherits
    try:
        sparkd.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sparkd.proc is not None  # room for every connection: the soft fd limit raised
    limits = Path(f"/proc/{sparkd.proc.pid}/limits").read_text()
    fields = next(ln for ln in limits.splitlines() if ln.startswith("Max open files")).split()
    soft, hard = int(fields[3]), (10**9 if fields[4] == "unlimited" else int(fields[4]))
    assert soft >= min(65536, hard)
    hog = start_hog(sparkd.socket, OTHER_UID, 1000, 12)
    try:
        _wait(lambda: metric(metrics(sparkd), "spark_connections_refused_total") > 100, 30,
              "the hog being turned away")
        for g in range(8):  # root's prolog and epilog get through every time
            job = f"90{g}"
            reply = sparkd.prolog(job, watts=400, gpus=[g])
            assert reply["ok"], reply
            assert sparkd.limit_mw(g) == 400_000
            assert sparkd.request({"op": "epilog", "job_id": job})["ok"]
        # another user is not locked out either: the hog has only its own quota
        assert sparkd.request_as(OWNER_UID, {"op": "status"})["ok"]
    finally:
        out, err = hog.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["busy"] > 100 and seen["held_at_end"] <= 1000, (seen, err)
    text = metrics(sparkd)
    refused = {r: metric(text, "spark_connections_refused_total", reason=r)
               for r in ("per-uid", "rate", "pool", "idle-timeout")}
    assert refused["per-uid"] + refused["rate"] > 100, refused
    assert refused["pool"] == 0  # one uid never reaches the shared pool's end
    # counted, not recorded one by one: a few summary PERs for thousands of refusals
    def summaries() -> list[dict[str, Any]]:
        return [r["body"] for r in sparkd.records("reject")
                if r["body"]["requester"]["uid"] == OTHER_UID]
    _wait(lambda: sum(b["suppressed"]["count"] for b in summaries())
          == sum(refused.values()) + metric(text, "spark_connections_refused_total",
                                             reason="partial-timeout"), 20,
          "every refusal in a summary PER")
    assert all(b["code"] == "busy" and "reasons" in b["suppressed"] for b in summaries())
    assert len(summaries()) <= 20 < sum(refused.values())
    caps = [r for r in sparkd.records("cap") if r["body"].get("job_id", "").startswith("90")]
    assert len(caps) == 8 and len(sparkd.records("restore")) == 8


def test_trickling_bytes_does_not_extend_the_idle_timeout(sparkd: Sparkd) -> None:
    sparkd.config.write_text(sparkd.config.read_text()
                             + "connections: {idle_timeout_s: 1}\n")
    sparkd.start()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sparkd.socket))
        closed = False
        for _ in range(60):  # one byte every 0.2 s would keep a per-read timeout alive
            try:
                s.sendall(b" ")
                s.settimeout(0.2)
                closed = s.recv(100) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed, "the daemon kept a connection that never sent a whole request"
    assert sparkd.request({"op": "status"})["connections"]["timed_out"] >= 1


def _mode(path: Path) -> tuple[str, int]:
    st = path.stat()
    return oct(stat.S_IMODE(st.st_mode)), st.st_gid


def _journal_a_line(sparkd: Sparkd) -> None:
    sparkd.journal.write_text(json.dumps({"op": "epilog", "job_id": "55", "gpus": [7],
                                          "journaled_ns": 1, "hook_exit": "fail_open",
                                          "error": "x"}) + "\n")


def test_every_file_gets_an_explicit_mode_whatever_the_umask(sparkd: Sparkd) -> None:
    sparkd.add_job("61", gpus=[0])
    _journal_a_line(sparkd)
    sparkd.start(umask=0)
    assert sparkd.prolog("61", watts=400, gpus=[0])["ok"]
    state = sparkd.state_dir
    assert _mode(state)[0] == "0o700"
    files = [state / "ledger.db", state / "ledger.db-wal", state / "ledger.db-shm",
             sparkd.journal, Path(str(sparkd.journal) + ".reserve"), sparkd.spool,
             state / "intents.jsonl", state / "journal.cursor"]
    assert {str(p): _mode(p)[0] for p in files} == {str(p): "0o600" for p in files}
    # another local user can read none of it (not even with sqlite3 -readonly)
    probe = subprocess.run(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         sys.executable, "-I", "-S", "-c",
         "import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p, 'rb').read(1)\n"
         "        print('read', p)\n    except OSError:\n        pass",
         *map(str, files)], capture_output=True, text=True, timeout=30, check=False, cwd="/")
    assert probe.returncode == 0 and probe.stdout == "", probe.stdout + probe.stderr
    assert sparkd.stop() == 0
    # with an admin group named, group members may read: 0640 / 0750 and that group
    sparkd.config.write_text(sparkd.config.read_text() + "files: {group: nogroup}\n")
    sparkd.start(umask=0o077)
    gid = OTHER_UID  # nogroup
    assert _mode(state) == ("0o750", gid)
    for p in (state / "ledger.db", state / "ledger.db-wal", state / "ledger.db-shm",
              sparkd.journal, sparkd.spool):
        assert _mode(p) == ("0o640", gid), p


def test_status_shows_a_caller_only_their_own_jobs(sparkd: Sparkd) -> None:
    sparkd.add_job("71", uid=OWNER_UID, gpus=[0])
    sparkd.add_job("72", uid=4343, gpus=[1])
    sparkd.start()
    assert sparkd.prolog("71", watts=400, gpus=[0])["ok"]
    assert sparkd.prolog("72", watts=400, gpus=[1])["ok"]
    everything = sparkd.request({"op": "status"})
    assert sorted(j["job_id"] for j in everything["jobs"]) == ["71", "72"]
    owner = sparkd.request_as(OWNER_UID, {"op": "status"})
    assert [j["job_id"] for j in owner["jobs"]] == ["71"]
    gpus = {g["index"]: g for g in owner["gpus"]}
    assert gpus[0]["job"] == "71"
    assert gpus[1]["job"] is None and gpus[1]["held"] is True   # held, but not by whom
    assert '"72"' not in json.dumps(owner)
    stranger = sparkd.request_as(OTHER_UID, {"op": "status"})
    assert stranger["jobs"] == [] and '"71"' not in json.dumps(stranger)


def test_one_restore_per_job_end_across_kill_and_restart(sparkd: Sparkd) -> None:
    sparkd.add_job("81", gpus=[0, 1])
    sparkd.start()
    assert sparkd.prolog("81", watts=800, gpus=[0, 1])["ok"]
    sparkd.kill()
    sparkd.jobs["81"]["state"] = "COMPLETED"   # the job ends while sparkd is down ...
    sparkd.write_jobs()
    out = _hook(sparkd, "epilog", "81")        # ... and its epilog is journaled
    assert out.returncode == 0 and "journaled" in out.stderr
    sparkd.start()
    restores = [r for r in sparkd.records("restore") if r["body"].get("job_id") == "81"]
    assert len(restores) == 1, [r["body"]["authority"] for r in restores]
    assert restores[0]["body"]["authority"] == "automation:startup"
    assert restores[0]["body"]["energy_known"] is True
    (late,) = [r["body"] for r in sparkd.records("reject") if r["body"].get("job_id") == "81"]
    assert late["code"] == "already-restored" and late["source"] == "journal"
    # a repeated epilog, live or after another kill -9, records no second restore
    assert _hook(sparkd, "epilog", "81").returncode == 0
    sparkd.kill()
    sparkd.start()
    assert len([r for r in sparkd.records("restore") if r["body"].get("job_id") == "81"]) == 1
    assert sparkd.limit_mw(0) == sparkd.limit_mw(1) == 1_000_000
    assert re.search(r"already recorded \(PER seq \d+\)", json.dumps(
        [r["body"]["reason"] for r in sparkd.records("reject")]))
