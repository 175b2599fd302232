"""The one cluster stack: Slurm, job_submit.lua, the hooks, sparkd on every node, a head node.

Used by `sparkctl demo`, the real-Slurm tests and the multi-node tests. With
one node it all runs on this host (the host's name, loopback, free ports). With
N > 1 (see netns.py) the controller `ctl` and nodes `n1..nN` each get their own
network, UTS and mount namespaces, hostname and address; each node has its own
simulated GPUs, keys, ledger, sparkd and Karman rack stream, and the
controller's sparkd (no GPUs) turns job_submit.lua's denials into PERs. Inside
every host the layout is a real node's: the hook config and sparkd's socket on
/run/spark, its state (ledger, journal) on /run/spark/state. The head node is
the controller's namespace: it collects every host's ledger over ssh (an sshd
per host, keys made here), witnesses and merges them (`sparkctl collect`).

Everything runs under one `ServiceGroup`; `demo.json` records pids and the
namespaces, so a stack left running with --keep can be stopped by another
process (saved.py), leaving no process, namespace, bridge or mount behind.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from spark_slurm.demo.cluster import CONTROLLER, ClusterSpec, SlurmCluster, free_port
from spark_slurm.demo.install import find_repo, render_wrapper
from spark_slurm.demo.netns import Topology
from spark_slurm.demo.node import SparkNode, tool
from spark_slurm.demo.saved import STATE_FILE, save_state
from spark_slurm.demo.services import ServiceGroup, wait_for
from spark_slurm.demo.sshd import ClusterSsh
from spark_slurm.errors import DaemonUnavailable, InputError, SparkError
from spark_slurm.ledger.records import Record
from spark_slurm.policy.lua import write_lua

GPU_MODEL = "b200"
GPUS = 8
# 8 x 1,000 W: the node's feed carries its GPUs' full TDP (the Karman no-cap story).
NODE_BUDGET_W = 8000
RUN_DIR = "/run/spark"                  # on a namespaced host: hook.json, sparkd.sock
STATE_DIR = "/run/spark/state"          # on a namespaced host: ledger.db, journal.jsonl
KARMAN_PORT, METRICS_PORT, EXPORTER_PORT = 5557, 9400, 9557  # per namespace
__all__ = ["STATE_FILE", "ClusterStack", "StackSpec", "find_repo", "render_wrapper", "tool"]


@dataclass(frozen=True)
class StackSpec:
    """What to build; the defaults are the demo's single node."""

    nodes: int = 1                      # > 1: namespaced hosts ctl, n1..nN
    gpus: int = GPUS
    gpu_model: str = GPU_MODEL
    budget_w: int = NODE_BUDGET_W       # gpupower per node
    node_budgets_w: Mapping[str, int] = field(default_factory=dict)  # per-node overrides
    facility: bool = True               # the policy's facility path (follow-up PERs)
    karman: bool = True                 # a Karman rack stream per node (else `unavailable`)
    exporter: bool = True               # the Karman exporter (first node's stream)
    metrics: bool = True                # sparkd /metrics
    facility_before_s: float = 3.0
    facility_after_s: float = 4.0
    cluster_name: str = "spark-demo"
    automations: Mapping[str, float] = field(default_factory=lambda: {
        "maintain_period_s": 1.0, "checkpoint_interval_s": 10.0})
    daemon_extra: Mapping[str, Any] = field(default_factory=dict)  # merged into sparkd.yaml


@dataclass
class CollectRun:
    """One `sparkctl collect` on the head node: its exit status, report and stderr."""

    returncode: int
    report: dict[str, Any]
    stderr: str

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.report.get("nodes", []) if n["node"] == name)

    def findings(self, node: str | None = None) -> list[dict[str, Any]]:
        merge = self.report.get("merge") or {}
        return [f for f in merge.get("findings", []) if node is None or f["node"] == node]


class ClusterStack:
    """Paths, processes and helpers of one installation rooted at `root`."""

    def __init__(self, root: Path, repo: Path | None = None,
                 spec: StackSpec | None = None) -> None:
        self.root = root
        self.repo = repo or find_repo()
        self.spec = spec or StackSpec()
        self.namespaced = self.spec.nodes > 1
        r = root
        self.policy = r / "policy.yaml"
        self.compiled = r / "lua" / "spark_policy.lua"
        self.spool = r / "spool" / "denials.jsonl"
        self.trust_dir = r / "trust"     # the head node's trusted node keys
        self.plots = r / "plots"
        self.log_dir = r / "logs"
        self.head_dir = r / "head"
        self.cluster_db = self.head_dir / "cluster.db"
        self.witness_dir = self.head_dir / "witness"
        self.collect_dir = self.head_dir / "collect"
        self.services = ServiceGroup(self.log_dir)
        self.topology: Topology | None = None
        self.ssh: ClusterSsh | None = None
        self.cluster = SlurmCluster(r / "slurm", services=self.services)
        self.exporter_port = 0
        if self.namespaced:
            names = [f"n{i}" for i in range(1, self.spec.nodes + 1)]
            self.nodes = [self._node(n, r / "nodes" / n, self.spec.gpus) for n in names]
            self.controller = self._node(CONTROLLER, r / "nodes" / CONTROLLER, 0,
                                         spool=self.spool)
        else:
            node = self._node(self.cluster.node, r, self.spec.gpus, spool=self.spool)
            self.nodes = [node]
            self.controller = node      # one host: its sparkd ingests the spool too

    def _node(self, name: str, root: Path, gpus: int, spool: Path | None = None) -> SparkNode:
        ns = self.namespaced
        karman = self.spec.facility and self.spec.karman and gpus > 0
        return SparkNode(
            name, root, gpus=gpus, model=self.spec.gpu_model, services=self.services,
            in_ns=lambda argv: self.cluster.in_ns(name, argv), namespaced=ns, spool=spool,
            karman_port=(KARMAN_PORT if ns else free_port()) if karman else 0,
            metrics_port=(METRICS_PORT if ns else free_port()) if self.spec.metrics else 0)

    @property
    def hosts(self) -> list[SparkNode]:
        """Every host running sparkd: the controller (when it is its own host), the nodes."""
        return self.nodes if not self.namespaced else [self.controller, *self.nodes]

    def node(self, name: str) -> SparkNode:
        return next(n for n in self.hosts if n.name == name)

    # ------------------------------------------------------------------ build
    def _write_policy(self) -> None:
        policy = yaml.safe_load((self.repo / "etc" / "policy.yaml").read_text())
        policy.setdefault("admission", {})["spool"] = str(self.spool)
        facility = policy.setdefault("facility", {})
        if self.spec.facility:
            facility.update(enabled=True, before_s=self.spec.facility_before_s,
                            after_s=self.spec.facility_after_s)
        else:
            facility["enabled"] = False
        self.policy.write_text("# etc/policy.yaml as shipped; the stack moves the spool into "
                               "its directory and sets the facility windows\n"
                               + yaml.safe_dump(policy, sort_keys=False))
        write_lua(self.policy, self.compiled, str(self.spool))
        self.spool.touch()

    def build(self) -> None:
        """Write every file the services need; nothing is started here."""
        for sub in ("spool", "lua", "bin", "plots", "logs", "head"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_policy()
        bindir = self.root / "bin"
        hook_config: Path | str = (f"{RUN_DIR}/hook.json" if self.namespaced
                                   else self.nodes[0].hook_config)
        prolog, epilog, self.nhc = (
            render_wrapper(self.repo / "slurm" / name, bindir / name, hook_config)
            for name in ("prolog", "epilog", "spark-nhc-check"))
        self.cluster.spec = ClusterSpec(
            gpus=self.spec.gpus, gpupower_w=self.spec.budget_w, gpu_type=self.spec.gpu_model,
            prolog=prolog, epilog=epilog, node_gpupower_w=dict(self.spec.node_budgets_w),
            job_submit_files=(self.repo / "slurm" / "job_submit.lua", self.compiled))
        self.services.env = self.cluster.env
        for host in self.hosts:
            host.build(policy=self.policy, cluster=self.spec.cluster_name,
                       trust_dir=self.trust_dir, automations=self.spec.automations,
                       extra=self.spec.daemon_extra)
        if self.spec.exporter and self.spec.facility and self.spec.karman:
            self.exporter_port = EXPORTER_PORT if self.namespaced else free_port()
        if self.namespaced:
            assert self.topology is not None
            self.ssh = ClusterSsh(self.root / "ssh", {m.name: m.address for m in
                                                       self.topology.members.values()})
            self.ssh.build()
            (self.head_dir / "nodes.list").write_text(
                "# every host with a ledger: the controller (submit-time denials), the nodes\n"
                + "".join(f"{h.name}\n" for h in self.hosts))

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Build, then start every service in dependency order; all or nothing."""
        try:
            if self.namespaced:
                self._namespaces()
            self.build()
            self.cluster.start()
            for host in self.hosts:
                host.start_karman()
            for host in self.hosts:             # sparkd start-ups overlap
                host.start_daemon(wait=False)
            for host in self.hosts:
                host.wait_ready()
            if self.ssh is not None:
                self.ssh.start(self.services, self.cluster.in_ns)
            if self.exporter_port:
                first = self.nodes[0]
                self.services.start("karman-exporter", first.in_ns([
                    *tool("sparkctl"), "karman", "exporter", "--endpoint",
                    first.karman_endpoint, "--port", str(self.exporter_port),
                    "--bind-address", first.address]),
                    ready=lambda: _http_ok(self.exporter_url))
            if self.spec.metrics:
                wait_for(lambda: all(_http_ok(h.metrics_url) for h in self.hosts), 20)
            save_state(self)
        except BaseException:
            self.stop()
            raise
        return self

    def _namespaces(self) -> None:
        hosts = [CONTROLLER, *(n.name for n in self.nodes)]
        topo = Topology(self.root / "net", hosts, binds={
            h.name: [(h.run_dir, RUN_DIR), (h.state_dir, STATE_DIR)] for h in self.hosts})
        for h in self.hosts:
            h.run_dir.mkdir(parents=True, exist_ok=True)
            h.state_dir.mkdir(parents=True, exist_ok=True)
        self.topology = topo
        topo.up()
        self.cluster = SlurmCluster(self.root / "slurm", services=self.services, topology=topo)
        for h in self.hosts:
            h.address = topo.address(h.name)

    def stop(self) -> None:
        """Cancel jobs (their epilogs restore the GPUs), stop every service, and remove
        the namespaces and links."""
        try:
            self.cluster.stop()
        finally:
            self.services.stop_all()
            if self.topology is not None:
                self.topology.down()
            (self.root / STATE_FILE).unlink(missing_ok=True)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no node has a facility follow-up pending (audits then see every
        action validated); False when some still are after `timeout`."""
        def pending(node: SparkNode) -> int:
            try:
                return int(node.status().get("facility_pending", 0))
            except DaemonUnavailable:   # a daemon that is down has nothing in flight
                return 0

        return wait_for(lambda: not any(pending(n) for n in self.nodes),
                        timeout or self.spec.facility_after_s + 15, 0.3)

    # ------------------------------------------------------------ the head node
    def collect(self, *, cosign: bool = True, merge: bool = True, dest: Path | None = None,
                into: Path | None = None, witness: Path | None = None,
                keys: Path | None = None, max_skew_s: float = 2.0,
                timeout: float = 180) -> CollectRun:
        """`sparkctl collect` run on the head node (the controller's namespace) over ssh:
        every host's ledger fetched, witnessed (`cosign`) and merged (`merge`)."""
        if self.ssh is None:
            raise InputError("collection over ssh needs a namespaced (multi-node) stack")
        argv = [*tool("sparkctl"), "collect", "--nodes-file", str(self.head_dir / "nodes.list"),
                "--dest", str(dest or self.collect_dir), "--ssh", " ".join(self.ssh.command),
                "--ledger", f"{STATE_DIR}/ledger.db", "--socket", f"{RUN_DIR}/sparkd.sock",
                "--remote-sparkctl", tool("sparkctl")[0], "--keys", str(keys or self.trust_dir),
                "--witness-state", str(witness or self.witness_dir),
                "--max-skew", str(max_skew_s), "--json"]
        argv += ["--cosign"] if cosign else []
        argv += ["--into", str(into or self.cluster_db)] if merge else []
        res = subprocess.run(self.cluster.in_ns(CONTROLLER, argv), capture_output=True,
                             text=True, timeout=timeout, check=False, env=self.cluster.env)
        try:
            report = json.loads(res.stdout)
        except ValueError:
            raise SparkError(f"sparkctl collect printed no report (exit {res.returncode}): "
                             f"{res.stderr.strip()[-2000:]}") from None
        return CollectRun(res.returncode, report, res.stderr)

    # --------------------------------------------- the first node, as one host
    @property
    def sim_dir(self) -> Path:
        return self.nodes[0].sim_dir

    @property
    def keys_dir(self) -> Path:
        return self.nodes[0].keys_dir

    @property
    def ledger(self) -> Path:
        return self.nodes[0].ledger

    @property
    def journal(self) -> Path:
        return self.nodes[0].journal

    @property
    def state_dir(self) -> Path:
        return self.nodes[0].state_dir

    @property
    def daemon_config(self) -> Path:
        return self.nodes[0].daemon_config

    @property
    def daemon(self) -> subprocess.Popen[bytes] | None:
        """The first node's running sparkd process, if any."""
        name = self.nodes[0].service("sparkd")
        return next((s.process for s in self.services.services
                     if s.name == name and s.process.poll() is None), None)

    @property
    def socket(self) -> Path:
        return self.nodes[0].socket

    @property
    def hook_config(self) -> Path:
        return self.nodes[0].hook_config

    @property
    def daemon_log(self) -> Path:
        return self.nodes[0].daemon_log

    @property
    def hmac_key(self) -> Path:
        return self.nodes[0].hmac_key

    @property
    def signing_key(self) -> Path:
        return self.nodes[0].signing_key

    @property
    def public_key(self) -> Path:
        return self.nodes[0].public_key

    @property
    def metrics_url(self) -> str:
        return self.nodes[0].metrics_url

    @property
    def karman_endpoint(self) -> str:
        return self.nodes[0].karman_endpoint

    @property
    def exporter_url(self) -> str:
        return f"http://{self.nodes[0].address}:{self.exporter_port}/metrics"

    @property
    def facility_before_s(self) -> float:
        return self.spec.facility_before_s

    @property
    def facility_after_s(self) -> float:
        return self.spec.facility_after_s

    def set_hook_mode(self, mode: str, timeout_s: float = 5.0) -> None:
        for host in self.nodes:
            host.set_hook_mode(mode, timeout_s)

    def start_daemon(self, timeout: float = 60) -> None:
        self.nodes[0].start_daemon(timeout_s=timeout)

    def stop_daemon(self) -> None:
        self.nodes[0].stop_daemon()

    def log_tail(self, lines: int = 20) -> str:
        return self.nodes[0].log_tail(lines)

    def records(self, job_id: str | None = None) -> list[Record]:
        return self.nodes[0].records(job_id)

    def kinds(self, job_id: str) -> list[str]:
        return self.nodes[0].kinds(job_id)

    def wait_records(self, job_id: str | None, kind: str | None, count: int = 1,
                     timeout: float = 30) -> list[Record]:
        return self.nodes[0].wait_records(job_id, kind, count, timeout)

    def find_records(self, kind: str | None, job_id: str | None = None, count: int = 1,
                     timeout: float = 30, match: Mapping[str, Any] | None = None
                     ) -> list[Record]:
        return self.nodes[0].find_records(kind, job_id, count, timeout, match)

    def limits_w(self) -> dict[int, int]:
        return self.nodes[0].limits_w()

    def wait_limits(self, expect: dict[int, int], timeout: float = 30) -> dict[int, int]:
        return self.nodes[0].wait_limits(expect, timeout)

    def set_load(self, util: float, gpus: list[int] | None = None) -> None:
        self.nodes[0].set_load(util, gpus)

    def ingest(self) -> dict[str, Any]:
        """Ask the spool's sparkd (the controller's) to ingest now."""
        return self.controller.ingest()

    def wait_running(self, job_id: str, timeout: float = 60) -> None:
        state = self.cluster.wait_job(job_id, ("RUNNING",), timeout)
        if state != "RUNNING":
            raise SparkError(f"job {job_id} is {state}, not RUNNING:\n"
                             f"{self.cluster.log_tails()}\n{self.log_tail()}")

    def sparkctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `sparkctl` command the way an operator would, against this cluster."""
        res = subprocess.run([*tool("sparkctl"), *args], capture_output=True, text=True,
                             env=self.cluster.env, timeout=60, check=False)
        if check and res.returncode != 0:
            raise SparkError(f"sparkctl {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stderr.strip()}")
        return res


def _http_ok(url: str) -> bool:
    import urllib.request  # noqa: PLC0415 (only the stack's readiness checks use it)

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (cluster URL)
            return int(resp.status) == 200
    except (OSError, ValueError):
        return False

