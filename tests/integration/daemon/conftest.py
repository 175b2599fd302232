"""A real `sparkd` process on a temp socket with 8 simulated GPUs, driven by real requests.

Requests as other users run a client in a subprocess under `setpriv`, so the
daemon sees them through SO_PEERCRED exactly as it would in production. That
client is stdlib-only (`python -I -S`): the other user may not be able to read
this checkout (a `mktemp -d` clone is mode 0700), only to reach the socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.daemon import client
from spark_slurm.errors import DaemonUnavailable
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.ledger.keys import keygen

VENV_BIN = Path(sys.executable).parent
OWNER_UID = 4242  # a made-up job owner with no passwd entry
OTHER_UID = 65534  # nobody

POLICY = """\
version: 1
gpu:
  default_watts: 500
  min_watts: 200
  max_watts: 700
  on_exceed: clamp
tenants:
  physics:
    max_watts_per_gpu: 600
  students:
    max_watts_per_gpu: 350
    on_exceed: deny
permissions:
  owner_may: lower
  admin_group: sparkadm
thermal:
  enabled: true
  threshold_c: {threshold}
  release_c: {release}
  throttle_watts: 300
drift:
  action: {drift}
facility:
  enabled: true
  before_s: 1
  after_s: 1
  tolerance_w: 500
  tolerance_pct: 25
"""


def _wait(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Sparkd:
    """One sparkd subprocess plus its sim fleet, policy, jobs file and ledger."""

    def __init__(self, root: Path, *, drift: str = "reconcile",
                 karman: str | None = None, thermal_c: tuple[int, int] = (52, 45),
                 keys: bool = False, extra_config: str = "") -> None:
        self.root = root
        self.sim_dir = root / "sim"
        self.state_dir = root / "state"
        self.socket = root / "run" / "sparkd.sock"
        self.jobs_file = root / "jobs.json"
        self.policy = root / "policy.yaml"
        self.journal = root / "journal.jsonl"
        self.spool = root / "denials.jsonl"
        self.config = root / "sparkd.yaml"
        self.log = root / "sparkd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.command = [str(VENV_BIN / "sparkd")]  # argv before `--config FILE`
        self.fleet = SimFleet.init(self.sim_dir, 8, "b200")
        self.jobs: dict[str, dict[str, Any]] = {}
        self.write_jobs()
        self.policy.write_text(POLICY.format(drift=drift, threshold=thermal_c[0],
                                             release=thermal_c[1]))
        karman_line = f"karman: {{endpoint: '{karman}', topic: cycle-aligned}}\n" if karman else ""
        self.keys = keygen(root / "keys") if keys else None
        if self.keys is not None:
            karman_line += (f"keys: {{hmac: {self.keys.hmac_key}, "
                            f"signing: {self.keys.signing_key}}}\n")
        self.config.write_text(
            f"node: n1\nstate_dir: {self.state_dir}\n"
            f"socket: {{path: {self.socket}, mode: '0666'}}\n"
            f"gpu: {{backend: sim, state_dir: {self.sim_dir}}}\n"
            f"policy: {self.policy}\n"
            f"job_context: {{source: static, path: {self.jobs_file}}}\n"
            f"journal_path: {self.journal}\nspool_path: {self.spool}\n"
            f"metrics: {{address: 127.0.0.1, port: {_free_port()}}}\n"
            "sampler: {rate_hz: 10, seconds: 60}\n"
            "automations: {period_s: 0.25, maintain_period_s: 1}\n" + karman_line
            + extra_config)

    # -- jobs known to the (static) job-context source ---------------------------
    def add_job(self, job_id: str, *, uid: int = OWNER_UID, account: str = "physics",
                gpus: list[int] | None = None, state: str = "RUNNING") -> None:
        self.jobs[job_id] = {"user": f"u{uid}", "uid": uid, "account": account,
                             "partition": "gpu", "node_gpus": {"n1": gpus or [0, 1, 2, 3]},
                             "state": state}
        self.write_jobs()

    def write_jobs(self) -> None:
        tmp = self.jobs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jobs))
        os.replace(tmp, self.jobs_file)

    # -- process -------------------------------------------------------------------
    def start(self, wait: bool = True, umask: int = -1) -> Sparkd:
        self.socket.parent.mkdir(exist_ok=True)
        os.chmod(self.socket.parent, 0o755)
        out = self.log.open("ab")
        self.proc = subprocess.Popen([*self.command, "--config", str(self.config)],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, umask=umask)
        out.close()
        if wait:
            _wait(self._ready, 30, f"sparkd ready (log: {self.log_text()[-2000:]})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sparkd exited {self.proc.returncode}: {self.log_text()}")
        try:
            return bool(self.request({"op": "status"}).get("ok"))
        except (OSError, DaemonUnavailable):
            return False

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def scrape(self, port: int | None = None) -> str:
        """The /metrics text. A failed scrape says whether sparkd is still running and
        shows its log, so a failure under a loaded CI machine can be read afterwards."""
        if port is None:
            port = int(self.request({"op": "status"})["metrics_port"])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as res:
                text: str = res.read().decode()
        except OSError as exc:
            code = None if self.proc is None else self.proc.poll()
            state = "running" if self.proc is not None and code is None else f"exited {code}"
            raise AssertionError(f"scrape of 127.0.0.1:{port} failed: {exc}; sparkd {state}; "
                                 f"log: {self.log_text()[-4000:]}") from exc
        return text

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- talking to it ---------------------------------------------------------------
    def request(self, payload: dict[str, Any] | bytes, timeout: float = 20) -> dict[str, Any]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode() + b"\n"
        reply: dict[str, Any] = json.loads(client.exchange(data, self.socket, timeout))
        return reply

    def send_as(self, uid: int, lines: list[str]) -> list[dict[str, Any]]:
        """Send request lines on one connection from a child process running as `uid`
        (SO_PEERCRED sees that uid); the replies, in order."""
        out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                              sys.executable, "-I", "-S", "-c", _SEND, str(self.socket),
                              *lines],
                             capture_output=True, text=True, timeout=60, check=False,
                             cwd="/")
        assert out.returncode == 0, out.stderr
        replies: list[dict[str, Any]] = json.loads(out.stdout)
        return replies

    def request_as(self, uid: int, payload: dict[str, Any]) -> dict[str, Any]:
        """One request from a child process running as `uid`."""
        return self.send_as(uid, [json.dumps(payload)])[0]

    def prolog(self, job_id: str, **fields: Any) -> dict[str, Any]:
        job = self.jobs.get(job_id, {})
        payload = {"op": "prolog", "job_id": job_id, "user": job.get("user", "root"),
                   "uid": job.get("uid", 0), "partition": "gpu", **fields}
        return self.request(payload)

    # -- ledger ------------------------------------------------------------------------
    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every PER (seq, kind, body), read-only through sqlite (the daemon keeps writing)."""
        conn = sqlite3.connect(f"file:{self.state_dir / 'ledger.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT seq, kind, body FROM per ORDER BY seq").fetchall()
        finally:
            conn.close()
        out = []
        for seq, k, stored in rows:
            if kind is not None and k != kind:
                continue
            envelope = json.loads(stored)
            out.append({"seq": seq, "kind": k, "body": envelope.get("body", envelope)})
        return out

    def wait_record(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                    what: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [r for r in self.records() if predicate(r)]
            return bool(found)

        _wait(check, timeout_s, what)
        return found[0]

    def limit_mw(self, gpu: int) -> int:
        return self.fleet.state(gpu).enforced_mw()


# The client `send_as` runs as another user: one connection, a reply per line.
_SEND = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
replies = s.makefile("rb")
out = []
for line in sys.argv[2:]:
    s.sendall(line.encode() + b"\\n")
    out.append(json.loads(replies.readline()))
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def root() -> Iterator[Path]:
    """A world-traversable temp dir (other uids must reach the socket)."""
    path = Path(tempfile.mkdtemp(prefix="sparkd-test-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sparkd(root: Path) -> Iterator[Sparkd]:
    daemon = Sparkd(root)
    try:
        yield daemon
    finally:
        with contextlib.suppress(Exception):
            daemon.stop()
