"""The whole product on one machine, in one directory, for the demo and its test.

Builds and starts, in order: 8 simulated B200 GPUs (matched to fake
/dev/nvidia0-7 files for gres.conf), ledger keys, the site policy (the shipped
etc/policy.yaml with its spool moved into the directory and shorter facility
windows) compiled to Lua next to slurm.conf with job_submit.lua, prolog/epilog
wrappers rendered for this interpreter, munge + slurmctld + slurmd, the live
Karman rack stream driven by the sim GPUs, sparkd (sim backend, scontrol job
context, Karman facility path, Prometheus metrics), and the Karman exporter.
Everything runs under one `ServiceGroup`; `demo.json` records the pids so that
a cluster left running with --keep can be stopped later by another process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from spark_slurm.daemon import client
from spark_slurm.demo.cluster import ClusterSpec, SlurmCluster, free_port
from spark_slurm.demo.services import ServiceGroup, wait_for
from spark_slurm.errors import DaemonUnavailable, InputError, ServiceError, SparkError
from spark_slurm.files.layout import Layout, render
from spark_slurm.files.shipped import data_root
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.ledger.keys import HMAC_FILE, PUBLIC_FILE, SIGNING_FILE, keygen
from spark_slurm.ledger.reader import read_records
from spark_slurm.ledger.records import Record
from spark_slurm.policy.lua import write_lua

GPU_MODEL = "b200"
GPUS = 8
# 8 x 900 W: the top step of the Karman dataset's dynamic scenario fits the node budget.
NODE_BUDGET_W = 7200
STATE_FILE = "demo.json"


def find_repo(start: Path | None = None) -> Path:
    """The tree holding slurm/, etc/ and contrib/ as shipped (the demo installs from it):
    `start` or this package's checkout, else the admin files an installed wheel carries."""
    candidates = [Path(__file__).resolve().parents[2]]
    if start is not None:
        candidates.insert(0, start.resolve())
    for path in candidates:
        if (path / "slurm" / "job_submit.lua").is_file() and \
                (path / "etc" / "policy.yaml").is_file():
            return path
    return data_root()


def tool(name: str) -> list[str]:
    """argv prefix for one of our console scripts, from this interpreter's environment."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = {"sparkctl": "spark_slurm.cli", "sparkd": "spark_slurm.daemon.main"}[name]
    return [sys.executable, "-m", module]


def render_wrapper(template: Path, out: Path, hook_config: Path) -> Path:
    """A slurm/ wrapper with its install placeholders filled for this interpreter
    (as `sparkctl files install` fills them, with this run's hook config)."""
    layout = replace(Layout.current(), hook_config=hook_config)
    out.write_text(render(template.read_text(), layout.values(), str(template)))
    out.chmod(0o755)
    return out


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback URL)
            return int(resp.status) == 200
    except OSError:
        return False


@dataclass
class DemoStack:
    """Paths, ports and processes of one demo installation rooted at `root`."""

    root: Path
    repo: Path
    facility_before_s: float = 3.0
    facility_after_s: float = 4.0
    services: ServiceGroup = field(init=False)
    cluster: SlurmCluster = field(init=False)

    def __post_init__(self) -> None:
        r = self.root
        self.sim_dir = r / "sim"
        self.keys_dir = r / "keys"
        self.state_dir = r / "spark"
        self.ledger = self.state_dir / "ledger.db"
        self.journal = self.state_dir / "journal.jsonl"
        self.spool = r / "spool" / "denials.jsonl"
        self.socket = r / "run" / "sparkd.sock"
        self.hook_config = r / "hook.json"
        self.policy = r / "policy.yaml"
        self.compiled = r / "lua" / "spark_policy.lua"
        self.daemon_config = r / "sparkd.yaml"
        self.plots = r / "plots"
        self.log_dir = r / "logs"
        self.karman_port = self.metrics_port = self.exporter_port = 0
        self.services = ServiceGroup(self.log_dir)
        self.cluster = SlurmCluster(r / "slurm", services=self.services)

    @property
    def karman_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.karman_port}"

    @property
    def hmac_key(self) -> Path:
        return self.keys_dir / HMAC_FILE

    @property
    def signing_key(self) -> Path:
        return self.keys_dir / SIGNING_FILE

    @property
    def public_key(self) -> Path:
        return self.keys_dir / PUBLIC_FILE

    @property
    def trust_dir(self) -> Path:
        """The head node's view of this node's keys (`<node>.pub`, `<node>.hmac`), as
        `merge --keys` and `audit --keys` take them."""
        return self.root / "trust"

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Write every file the services need; nothing is started here."""
        for sub in ("spark", "spool", "run", "lua", "bin", "plots", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        SimFleet.init(self.sim_dir, GPUS, GPU_MODEL, force=True)
        if not self.keys_dir.exists():
            keygen(self.keys_dir)
        self.trust_dir.mkdir(mode=0o700, exist_ok=True)
        for src, suffix in ((self.public_key, "pub"), (self.hmac_key, "hmac")):
            dest = self.trust_dir / f"{self.cluster.node}.{suffix}"
            shutil.copyfile(src, dest)
            dest.chmod(0o600)
        policy = yaml.safe_load((self.repo / "etc" / "policy.yaml").read_text())
        policy.setdefault("admission", {})["spool"] = str(self.spool)
        facility = policy.setdefault("facility", {})
        facility.update(enabled=True, before_s=self.facility_before_s,
                        after_s=self.facility_after_s)
        self.policy.write_text("# etc/policy.yaml as shipped; the demo moves the spool into "
                               "its directory and shortens the facility windows\n"
                               + yaml.safe_dump(policy, sort_keys=False))
        write_lua(self.policy, self.compiled, str(self.spool))
        self.spool.touch()
        self.set_hook_mode("fail_closed")
        bindir = self.root / "bin"
        prolog = render_wrapper(self.repo / "slurm" / "prolog", bindir / "prolog",
                                self.hook_config)
        epilog = render_wrapper(self.repo / "slurm" / "epilog", bindir / "epilog",
                                self.hook_config)
        self.cluster.spec = ClusterSpec(
            gpus=GPUS, gpupower_w=NODE_BUDGET_W, gpu_type=GPU_MODEL, prolog=prolog,
            epilog=epilog, job_submit_files=(self.repo / "slurm" / "job_submit.lua",
                                             self.compiled))
        self.services.env = self.cluster.env
        self.karman_port, self.metrics_port, self.exporter_port = (
            free_port(), free_port(), free_port())
        self.daemon_config.write_text(yaml.safe_dump({
            "node": self.cluster.node, "cluster": "spark-demo",
            "state_dir": str(self.state_dir), "ledger": str(self.ledger),
            "policy": str(self.policy), "socket": {"path": str(self.socket)},
            "keys": {"hmac": str(self.hmac_key), "signing": str(self.signing_key)},
            "gpu": {"backend": "sim", "state_dir": str(self.sim_dir)},
            "karman": {"endpoint": self.karman_endpoint},
            "metrics": {"address": "127.0.0.1", "port": self.metrics_port},
            "job_context": {"source": "scontrol"},
            "journal_path": str(self.journal), "spool_path": str(self.spool),
        }, sort_keys=False))

    def set_hook_mode(self, mode: str, timeout_s: float = 5.0) -> None:
        """Rewrite the hook config; the wrappers read it on every run."""
        self.hook_config.write_text(json.dumps({
            "socket": str(self.socket), "journal": str(self.journal),
            "timeout_s": timeout_s, "on_daemon_down": mode}))

    # -------------------------------------------------------------- lifecycle
    def start(self) -> DemoStack:
        """Build, then start every service in dependency order; all or nothing."""
        self.build()
        try:
            self.cluster.start()
            self.services.start("karman-sim", [
                *tool("sparkctl"), "karman", "sim", "--gpus", str(self.sim_dir),
                "--bind", self.karman_endpoint], ready=lambda: _port_open(self.karman_port))
            self.services.start("sparkd", [*tool("sparkd"), "--config",
                                           str(self.daemon_config)],
                                ready=self._daemon_ready, timeout_s=60)
            self.services.start("karman-exporter", [
                *tool("sparkctl"), "karman", "exporter", "--endpoint", self.karman_endpoint,
                "--port", str(self.exporter_port)],
                ready=lambda: _http_ok(f"http://127.0.0.1:{self.exporter_port}/metrics"))
            wait_for(lambda: _http_ok(self.metrics_url), 10)
            self.save_state()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _daemon_ready(self) -> bool:
        try:
            client.status(self.socket)
        except DaemonUnavailable:
            return False
        return True

    def save_state(self) -> None:
        """Pids and endpoints, so `sparkctl demo --stop DIR` works from any shell."""
        state = {"root": str(self.root), "slurm_conf": str(self.cluster.conf),
                 "socket": str(self.socket), "ledger": str(self.ledger),
                 "metrics": self.metrics_url, "karman": self.karman_endpoint,
                 "exporter": f"http://127.0.0.1:{self.exporter_port}/metrics",
                 "services": [{"name": s.name, "pid": s.pid()}
                              for s in self.services.services]}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def stop(self) -> None:
        """Cancel jobs (their epilogs restore the GPUs), then stop every service."""
        try:
            self.cluster.stop()
        finally:
            self.services.stop_all()
            (self.root / STATE_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------ the GPUs
    def fleet(self) -> SimFleet:
        return SimFleet.open(self.sim_dir)

    def set_load(self, util: float, gpus: list[int] | None = None) -> None:
        """The simulated workload: what a job's kernels would make the GPUs draw."""
        fleet = self.fleet()
        for g in gpus if gpus is not None else list(range(GPUS)):
            fleet.set_load(util, g)

    def limits_w(self) -> dict[int, int]:
        fleet = self.fleet()
        return {i: fleet.limits(i).enforced_mw // 1000 for i in range(GPUS)}

    def sparkctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `sparkctl` command the way an operator would, against this cluster."""
        res = subprocess.run([*tool("sparkctl"), *args], capture_output=True, text=True,
                             env=self.cluster.env, timeout=60, check=False)
        if check and res.returncode != 0:
            raise SparkError(f"sparkctl {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stderr.strip()}")
        return res

    def ingest(self) -> dict[str, Any]:
        """Ask sparkd to ingest the denial spool now (it also does on start)."""
        return client.checked(client.request({"op": "ingest"}, self.socket, 30.0))

    # ---------------------------------------------------------------- ledger
    def records(self, job_id: str | None = None) -> list[Record]:
        if not self.ledger.exists():
            return []
        return list(read_records(self.ledger, job_id=job_id))

    def wait_records(self, kind: str, job_id: str | None = None, count: int = 1,
                     timeout: float = 30, match: dict[str, Any] | None = None) -> list[Record]:
        """Records of `kind` (optionally with body fields equal to `match`) once `count` exist;
        what was found, possibly fewer, after `timeout`."""
        found: list[Record] = []

        def enough() -> bool:
            nonlocal found
            found = [r for r in self.records(job_id) if r.kind == kind and all(
                r.body.get(k) == v for k, v in (match or {}).items())]
            return len(found) >= count

        wait_for(enough, timeout, 0.2)
        return found


def stop_saved(root: Path, timeout_s: float = 15.0) -> list[str]:
    """Stop a demo left running with --keep, from its demo.json; returns what was stopped."""
    path = root / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: no running demo recorded there") from None
    conf = Path(str(state.get("slurm_conf", "")))
    env = dict(os.environ, SLURM_CONF=str(conf))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if not conf.is_file():
            raise FileNotFoundError(conf)  # no cluster to drain
        subprocess.run(["scancel", "-u", "root"], env=env, capture_output=True, timeout=20,
                       check=False)
        wait_for(lambda: not subprocess.run(["squeue", "-h", "-o", "%i"], env=env,
                                            capture_output=True, text=True, timeout=10,
                                            check=False).stdout.strip(), 15, 0.3)
    stopped = []
    for entry in reversed(state.get("services", [])):
        pid = int(entry["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            stopped.append(f"{entry['name']} (pid {pid})")
            if not wait_for(lambda p=pid: not _alive(p), timeout_s):  # type: ignore[misc]
                os.kill(pid, signal.SIGKILL)
    path.unlink()
    if not stopped:
        raise ServiceError("demo", "none of its processes was still running", str(path))
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False

