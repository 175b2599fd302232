"""sparkd as an installed service lives it: --version, the HMAC key moved off the node,
exit statuses systemd acts on, and a Karman stream whose bindings cannot load."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from spark_slurm.errors import DaemonUnavailable
from tests.integration.daemon.conftest import VENV_BIN, Sparkd, _free_port

SPARKD = str(VENV_BIN / "sparkd")
SPARKCTL = str(VENV_BIN / "sparkctl")


def test_version_is_the_package_version() -> None:
    want = importlib.metadata.version("spark-slurm")
    out = subprocess.run([SPARKD, "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert (out.returncode, out.stdout.strip()) == (0, f"sparkd {want}")
    out = subprocess.run([SPARKCTL, "--version"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and out.stdout.split()[-1] == want


def test_hmac_key_moved_off_the_node_once_the_ledger_exists(root: Path) -> None:
    sparkd = Sparkd(root / "d", keys=True)
    assert sparkd.keys is not None
    sparkd.add_job("11", gpus=[0, 1])
    sparkd.add_job("12", gpus=[2, 3])
    try:
        sparkd.start()
        assert sparkd.prolog("11", watts=800, gpus=[0, 1])["ok"]
        assert sparkd.stop() == 0
        # as docs/admin-guide.md says: K[0] goes to whoever audits; keys.hmac stays set
        auditor = root / "auditor"
        auditor.mkdir()
        shutil.move(sparkd.keys.hmac_key, auditor / "hmac.key")
        sparkd.start()
        assert "is not on this node" in sparkd.log_text()
        assert sparkd.prolog("12", watts=800, gpus=[2, 3])["ok"]
        assert sparkd.stop() == 0
    finally:
        sparkd.stop()
    jobs = {r["body"].get("job_id") for r in sparkd.records("cap")}
    assert {"11", "12"} <= jobs
    out = subprocess.run([SPARKCTL, "verify", str(sparkd.state_dir / "ledger.db"), "--key",
                          str(auditor / "hmac.key"), "--pubkey", str(sparkd.keys.public_key),
                          "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (result,) = json.loads(out.stdout)
    assert result["ok"] and result["hmac_checked"], result
    # every record, those after the restart included, carries a MAC the auditor's K[0] checks
    conn = sqlite3.connect(sparkd.state_dir / "ledger.db")
    unmaced = conn.execute("SELECT count(*) FROM per WHERE mac IS NULL").fetchone()[0]
    conn.close()
    assert unmaced == 0


def test_hmac_key_missing_before_the_ledger_exists_is_a_config_error(root: Path) -> None:
    sparkd = Sparkd(root / "d", keys=True)
    assert sparkd.keys is not None
    sparkd.keys.hmac_key.unlink()
    out = subprocess.run([SPARKD, "--config", str(sparkd.config)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2  # systemd does not restart it: an admin must act
    assert out.stderr.startswith(f"sparkd: keys.hmac: {sparkd.keys.hmac_key}: cannot read key")
    assert "needed to create the ledger" in out.stderr and "Traceback" not in out.stderr


def test_a_failure_that_is_not_the_config_exits_1_for_systemd_to_retry(root: Path) -> None:
    sparkd = Sparkd(root / "d")
    sparkd.socket.parent.mkdir()
    sparkd.socket.mkdir()  # something else holds the socket path: not a config error
    (sparkd.socket / "x").write_text("")
    out = subprocess.run([SPARKD, "--config", str(sparkd.config)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("sparkd: ") and "sparkd.sock" in last, out.stderr
    assert "Traceback" not in out.stderr


def test_unloadable_karman_bindings_leave_the_node_governed(root: Path) -> None:
    sparkd = Sparkd(root / "d", karman=f"tcp://127.0.0.1:{_free_port()}")
    # the generated module cannot be imported, as in a wheel built without bindings
    sparkd.command = [sys.executable, "-c",
                      "import sys; sys.modules['spark_slurm.karman._proto.karman_pb2'] = None; "
                      "from spark_slurm.daemon.main import main; sys.exit(main(sys.argv[1:]))"]
    sparkd.add_job("21", gpus=[0, 1])
    try:
        sparkd.start()
        status = sparkd.request({"op": "status"})
        assert "bindings missing" in status["karman"]["error"], status["karman"]
        reply = sparkd.prolog("21", watts=800, gpus=[0, 1])
        assert reply["ok"], reply
        follow = sparkd.wait_record(
            lambda r: r["kind"] == "facility" and r["body"]["ref"]["seq"] == reply["seq"], 20,
            "facility follow-up")
        assert follow["body"]["verdict"] == "unavailable"
        assert "bindings missing" in follow["body"]["reason"]
        text = sparkd.scrape(status["metrics_port"])
        # a broken stream reads as a blind one, so the SparkKarmanStreamBlind alert fires
        assert 'spark_karman_stream{node="n1",stat="decoded"} 0.0' in text
        assert "running without the facility path" in sparkd.log_text()
        assert sparkd.stop() == 0
    finally:
        sparkd.stop()


def test_the_first_status_answer_already_names_the_metrics_port(root: Path) -> None:
    # the socket appearing means ready: whatever answers on it must already serve
    # /metrics, or a scrape (or `sparkctl status`) right after start sees "off"
    sparkd = Sparkd(root / "d").start(wait=False)
    try:
        first: dict[str, object] = {}

        def answered() -> bool:
            assert sparkd.proc is not None and sparkd.proc.poll() is None, sparkd.log_text()
            try:
                first.update(sparkd.request({"op": "status"}))
            except (OSError, DaemonUnavailable):
                time.sleep(0.002)
                return False
            return True

        deadline = time.monotonic() + 30
        while not answered():
            assert time.monotonic() < deadline, f"sparkd never answered: {sparkd.log_text()}"
        port = first["metrics_port"]
        assert isinstance(port, int) and port > 0, first
        assert "spark_pers_total" in sparkd.scrape(port)
        assert sparkd.stop() == 0
    finally:
        sparkd.stop()
