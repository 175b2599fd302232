"""The whole product on one throwaway node: Slurm + job_submit.lua + spark-hook + sparkd.

Builds, in one temporary directory: 8 simulated GPUs matched to the fake
/dev/nvidia0-7 files, a site policy (etc/policy.yaml with the spool moved into
the directory) compiled to Lua, prolog/epilog wrappers rendered from slurm/ with
this interpreter and hook, the hook's JSON config, and a sparkd config that uses
the scontrol job-context source. sparkd runs as a subprocess and can be stopped
and restarted (the daemon-down cases).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spark_slurm import hook
from spark_slurm.demo.cluster import ClusterSpec, SlurmCluster
from spark_slurm.demo.stack import render_wrapper
from spark_slurm.errors import SparkError
from spark_slurm.ledger.reader import read_records
from spark_slurm.ledger.records import Record

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
GPU_TYPE = "b200"
NODE_BUDGET_W = 4000   # below 8 x 700 W, so power (not GPU count) can be the limit


@dataclass
class SparkStack:
    root: Path
    cluster: SlurmCluster = field(init=False)
    daemon: subprocess.Popen[bytes] | None = None
    daemon_extra: dict[str, Any] = field(default_factory=dict)  # merged into sparkd.yaml

    def __post_init__(self) -> None:
        r = self.root
        self.sim_dir = r / "sim"
        self.state_dir = r / "spark"
        self.spool = r / "spool" / "denials.jsonl"
        self.journal = r / "spark" / "journal.jsonl"
        self.socket = r / "run" / "sparkd.sock"
        self.scheduler_socket = r / "run" / "sparkd-scheduler.sock"  # the hook's (root only)
        self.hook_config = r / "hook.json"
        self.policy = r / "policy.yaml"
        self.compiled = r / "lua" / "spark_policy.lua"
        self.daemon_config = r / "sparkd.yaml"
        self.ledger = self.state_dir / "ledger.db"
        self.daemon_log = r / "sparkd.log"

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        for sub in ("spark", "spool", "run", "lua", "bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._sparkctl("sim", "init", str(self.sim_dir), "--gpus", "8", "--model", GPU_TYPE)
        policy = yaml.safe_load((REPO / "etc" / "policy.yaml").read_text())
        policy.setdefault("admission", {})["spool"] = str(self.spool)
        policy.setdefault("facility", {})["enabled"] = False   # no Karman stream here
        self.policy.write_text(yaml.safe_dump(policy, sort_keys=False))
        self._sparkctl("policy", "compile", str(self.policy), "--lua", str(self.compiled),
                       "--spool", str(self.spool))
        self.set_hook_mode("fail_closed")
        bindir = self.root / "bin"
        prolog = render_wrapper(REPO / "slurm" / "prolog", bindir / "prolog", self.hook_config)
        epilog = render_wrapper(REPO / "slurm" / "epilog", bindir / "epilog", self.hook_config)
        self.nhc = render_wrapper(REPO / "slurm" / "spark-nhc-check", bindir / "spark-nhc-check",
                                  self.hook_config)
        self.cluster = SlurmCluster(self.root / "slurm", ClusterSpec(
            gpupower_w=NODE_BUDGET_W, gpu_type=GPU_TYPE, prolog=prolog, epilog=epilog,
            job_submit_files=(REPO / "slurm" / "job_submit.lua", self.compiled)))
        self.daemon_config.write_text(yaml.safe_dump({
            "node": self.cluster.node, "cluster": "spark", "state_dir": str(self.state_dir),
            "ledger": str(self.ledger), "policy": str(self.policy),
            "socket": {"path": str(self.socket)},
            "gpu": {"backend": "sim", "state_dir": str(self.sim_dir)},
            "job_context": {"source": "scontrol"},
            "journal_path": str(self.journal), "spool_path": str(self.spool),
            **self.daemon_extra,
        }))

    def set_hook_mode(self, mode: str, timeout_s: float = 5.0) -> None:
        """Rewrite the hook config; the wrappers read it on every run."""
        self.hook_config.write_text(json.dumps({
            "socket": str(self.scheduler_socket), "journal": str(self.journal),
            "timeout_s": timeout_s, "on_daemon_down": mode}))

    def _sparkctl(self, *args: str) -> str:
        res = subprocess.run([str(VENV_BIN / "sparkctl"), *args], capture_output=True,
                             text=True, timeout=60, check=False)
        if res.returncode != 0:
            raise SparkError(f"sparkctl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    # -------------------------------------------------------------- lifecycle
    def start(self) -> SparkStack:
        self.build()
        self.cluster.start()
        try:
            self.start_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def start_daemon(self, timeout: float = 30) -> None:
        log = self.daemon_log.open("ab")
        self.daemon = subprocess.Popen(
            [str(VENV_BIN / "sparkd"), "--config", str(self.daemon_config)],
            stdout=log, stderr=subprocess.STDOUT, env=self.cluster.env,
            start_new_session=True)
        log.close()
        cfg = hook.load_config(str(self.hook_config))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise SparkError(f"sparkd exited {self.daemon.returncode}: {self.log_tail()}")
            if hook.check_status(cfg, out=_Null()) == 0:
                return
            time.sleep(0.2)
        raise SparkError(f"sparkd did not answer within {timeout}s: {self.log_tail()}")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(timeout=10)
        self.daemon = None

    def stop(self) -> None:
        try:
            self.cluster.stop()
        finally:
            self.stop_daemon()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sparkd log)"

    # ---------------------------------------------------------------- queries
    def records(self, job_id: str | None = None) -> list[Record]:
        if not self.ledger.exists():
            return []
        return list(read_records(self.ledger, job_id=job_id))

    def kinds(self, job_id: str) -> list[str]:
        return [r.kind for r in self.records(job_id)]

    def wait_records(self, job_id: str, kind: str | None, count: int = 1,
                     timeout: float = 30) -> list[Record]:
        """Wait until the ledger holds `count` records of `kind` (None: any) for the job."""
        deadline = time.monotonic() + timeout
        found: list[Record] = []
        while time.monotonic() < deadline:
            found = [r for r in self.records(job_id) if kind is None or r.kind == kind]
            if len(found) >= count:
                return found
            time.sleep(0.2)
        raise SparkError(f"job {job_id}: {len(found)} {kind} PER(s) after {timeout}s; "
                           f"have {self.kinds(job_id)}\n{self.log_tail()}\n"
                           f"{self.cluster.log_tails()}")

    def limits_w(self) -> dict[int, int]:
        """Enforced limit of each sim GPU, in watts, as the out-of-band tool reports it."""
        out = json.loads(self._sparkctl("sim", "smi", str(self.sim_dir), "--json"))
        return {int(g["device"]["index"]): int(g["limits"]["enforced_mw"]) // 1000 for g in out}

    def wait_limits(self, expect: dict[int, int], timeout: float = 30) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        seen: dict[int, int] = {}
        while time.monotonic() < deadline:
            seen = self.limits_w()
            if all(seen.get(i) == w for i, w in expect.items()):
                return seen
            time.sleep(0.2)
        raise SparkError(f"sim limits {seen}, expected {expect}\n{self.log_tail()}")

    def wait_running(self, job_id: str, timeout: float = 60) -> None:
        state = self.cluster.wait_job(job_id, ("RUNNING",), timeout)
        if state != "RUNNING":
            raise SparkError(f"job {job_id} is {state}, not RUNNING:\n"
                               f"{self.cluster.log_tails()}\n{self.log_tail()}")


class _Null:
    def write(self, _text: str) -> int:
        return 0


def bodies(records: list[Record]) -> Iterator[dict[str, Any]]:
    for rec in records:
        yield rec.body
