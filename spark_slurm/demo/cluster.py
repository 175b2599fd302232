"""A throwaway Slurm cluster in one directory: munged, slurmctld and one or more slurmd.

With no `Topology` it is one node on this host (loopback, the host's name) and
the ports are picked free. With one, the controller `ctl` and every compute
node run in their own network, UTS and mount namespaces (see netns.py), each
with its own address and hostname, so `sbatch -N3` spans three real slurmd.
Every path (state, spool, logs, pids, the munge key and socket) lives under the
directory, so several clusters can share a machine. GPUs are plain files named
nvidiaN under `dev/` (gres.conf needs a File= for a gpu GRES); `gpupower` is a
count-only GRES in watts per node. The daemons run in the foreground under a
`ServiceGroup`, so a failed start or a failed scenario never leaves one behind.
Every Slurm client command goes through the injected `Runner`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spark_slurm.demo.netns import Topology
from spark_slurm.demo.services import ServiceGroup, wait_for
from spark_slurm.errors import ServiceError, SlurmCommandFailed
from spark_slurm.slurm.runner import Runner, RunResult, SubprocessRunner

START_TIMEOUT_S = 60.0
CONTROLLER = "ctl"          # the controller's hostname in a namespaced cluster
CTLD_PORT, SLURMD_PORT = 6817, 6818   # each namespace has its own port space
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                          "BOOT_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE"})


def free_port() -> int:
    """A TCP port the kernel just handed out (bind port 0), for a daemon to reuse."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def slurm_env(conf: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Slurm clients need for this cluster, without inherited job vars."""
    env = dict(os.environ if base is None else base)
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))]:
        del env[var]
    env["SLURM_CONF"] = str(conf)
    return env


@dataclass
class ClusterSpec:
    """What the cluster looks like; defaults match the design's example node."""

    gpus: int = 8
    gpupower_w: int = 5600
    gpu_type: str | None = None    # e.g. "b200": enables typed requests (gpu:b200:2)
    cpus: int = 16
    prolog: Path | None = None
    epilog: Path | None = None
    job_submit_files: Sequence[Path] = ()   # job_submit.lua and what it loads
    health_check: Path | None = None
    extra_conf: Sequence[str] = ()
    node_gpupower_w: Mapping[str, int] = field(default_factory=dict)  # per-node budgets
    partitions: Sequence[str] = ("gpu", "debug")


@dataclass
class SlurmCluster:
    """A running (or stopped) cluster; `env` is what Slurm client commands need.

    `node` is the (first) compute node; `nodes` all of them. With a `topology`
    (already up), the nodes are its members other than `ctl`."""

    root: Path
    spec: ClusterSpec = field(default_factory=ClusterSpec)
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    name: str = ""
    services: ServiceGroup | None = None
    runner: Runner | None = None
    topology: Topology | None = None

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "spk" + os.urandom(3).hex()
        self.conf_dir = self.root / "etc"
        self.conf = self.conf_dir / "slurm.conf"
        self.dev_dir = self.root / "dev"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.out_dir = self.root / "out"
        self.env = slurm_env(self.conf)
        if self.services is None:
            self.services = ServiceGroup(self.log_dir / "console", env=self.env)
        if self.runner is None:
            self.runner = SubprocessRunner(self.env, timeout_s=30.0)
        self.ctld_port = 0
        self.slurmd_port = 0
        if self.topology is not None:
            self.nodes = [n for n in self.topology.names if n != CONTROLLER]
            self.node = self.nodes[0]
            self.ctld_port, self.slurmd_port = CTLD_PORT, SLURMD_PORT
        else:
            self.nodes = [self.node]

    def in_ns(self, member: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run on `member` (`ctl` or a node): inside its namespaces, or as is."""
        return list(argv) if self.topology is None else self.topology.exec_argv(member, argv)

    def slurmd_service(self, node: str) -> str:
        return "slurmd" if self.topology is None else f"slurmd-{node}"

    # ----------------------------------------------------------------- config
    def gpu_devices(self) -> list[Path]:
        return [self.dev_dir / f"nvidia{i}" for i in range(self.spec.gpus)]

    def _host_lines(self) -> list[str]:
        """Where the controller and the slurmd live, and where each slurmd keeps its files."""
        r = self.root
        if self.topology is None:
            return [f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
                    f"SlurmdLogFile={self.log_dir / 'slurmd.log'}"]
        return [f"SlurmctldHost={CONTROLLER}({self.topology.address(CONTROLLER)})",
                f"SlurmdSpoolDir={r / 'nodes' / '%n' / 'spool'}",
                f"SlurmdPidFile={r / 'nodes' / '%n' / 'slurmd.pid'}",
                f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}"]

    def slurm_conf_text(self, job_submit: bool | None = None) -> str:
        """The slurm.conf; `job_submit` overrides whether the Lua plugin is on."""
        spec, r = self.spec, self.root
        use_lua = bool(spec.job_submit_files) if job_submit is None else job_submit
        ctld_host, slurmd_spool, slurmd_pid, slurmd_log = self._host_lines()
        lines = [
            f"ClusterName={self.name}",
            ctld_host,
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            slurmd_spool,
            slurmd_pid,
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            slurmd_log,
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "ReturnToService=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SlurmdParameters=config_overrides",
            "MessageTimeout=10",
            "InactiveLimit=0",
            "KillWait=2",
            "MinJobAge=300",
            "GresTypes=gpu,gpupower",
            "PrologFlags=Alloc",
            "PrologEpilogTimeout=60",
        ]
        if spec.prolog is not None:
            lines.append(f"Prolog={spec.prolog}")
        if spec.epilog is not None:
            lines.append(f"Epilog={spec.epilog}")
        if spec.health_check is not None:
            lines += [f"HealthCheckProgram={spec.health_check}", "HealthCheckInterval=60"]
        if use_lua:
            lines.append("JobSubmitPlugins=lua")
        lines += list(spec.extra_conf)
        typed = f"{spec.gpu_type}:" if spec.gpu_type else ""
        for node in self.nodes:
            where = ("NodeAddr=127.0.0.1" if self.topology is None else
                     f"NodeAddr={self.topology.address(node)} NodeHostname={node}")
            lines.append(
                f"NodeName={node} {where} CPUs={spec.cpus} RealMemory=1000 "
                f"Gres=gpu:{typed}{spec.gpus},gpupower:{self.budget_w(node)} State=UNKNOWN")
        for i, part in enumerate(spec.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(f"PartitionName={part} Nodes={','.join(self.nodes)} "
                         f"Default={default} MaxTime=INFINITE State=UP OverSubscribe=NO")
        return "\n".join(lines) + "\n"

    def budget_w(self, node: str) -> int:
        """The node's gpupower (watts): its override, else the spec's."""
        return int(self.spec.node_gpupower_w.get(node, self.spec.gpupower_w))

    def gres_conf_text(self) -> str:
        last = self.spec.gpus - 1
        typed = f"Type={self.spec.gpu_type} " if self.spec.gpu_type else ""
        text = f"Name=gpu {typed}File={self.dev_dir}/nvidia[0-{last}]\n"
        if not self.spec.node_gpupower_w:
            return text + f"Name=gpupower Count={self.spec.gpupower_w} Flags=CountOnly\n"
        return text + "".join(f"NodeName={n} Name=gpupower Count={self.budget_w(n)} "
                              "Flags=CountOnly\n" for n in self.nodes)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> SlurmCluster:
        """Write the configuration, start the daemons and wait for idle nodes."""
        for sub in ("etc", "dev", "log", "state", "spool", "run", "munge", "out"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes if self.topology is not None else ():
            (self.root / "nodes" / node / "spool").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        for dev in self.gpu_devices():
            dev.touch()
        for src in self.spec.job_submit_files:
            shutil.copy(src, self.conf_dir / Path(src).name)
        (self.conf_dir / "gres.conf").write_text(self.gres_conf_text())
        group = self._group()
        for attempt in range(3):  # a free port can be taken by someone else before we bind
            if self.topology is None:
                self.ctld_port = free_port()
                self.slurmd_port = free_port()
            self.conf.write_text(self.slurm_conf_text())
            try:
                if not any(s.name == "munged" for s in group.services):
                    self._start_munge()
                group.start("slurmctld", self.in_ns(CONTROLLER, [
                    "slurmctld", "-D", "-i", "-f", str(self.conf)]),
                    ready=lambda: self.run(["scontrol", "ping"], check=False)
                    .returncode == 0, timeout_s=START_TIMEOUT_S)
                for node in self.nodes:
                    group.start(self.slurmd_service(node), self.in_ns(node, [
                        "slurmd", "-D", "-f", str(self.conf), "-N", node]))
                self.wait_node_idle()
                return self
            except ServiceError:
                if attempt == 2 or self.topology is not None or not self._lost_a_port():
                    self.stop()
                    raise
                group.stop("slurmd")
                group.stop("slurmctld")
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _lost_a_port(self) -> bool:
        text = self.log_tails(lines=40)
        return "Address already in use" in text or "Unable to bind" in text

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        """The running Slurm daemons and munged by name (empty once stopped)."""
        names = {"munged", "slurmctld", *(self.slurmd_service(n) for n in self.nodes)}
        return {s.name: s.process for s in self._group().services if s.name in names}

    def _group(self) -> ServiceGroup:
        assert self.services is not None
        return self.services

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self._group().start("munged", self.in_ns(CONTROLLER, [
            "munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={m / 'munged.pid'}", f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}", "--num-threads=4",
        ]), ready=self.munge_socket.exists, timeout_s=START_TIMEOUT_S)

    def node_states(self) -> dict[str, str]:
        """Each node's state as sinfo prints it (`idle`, `mixed`, `drained`, ...)."""
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        out: dict[str, str] = {}
        for line in res.stdout.splitlines():
            name, _, state = line.strip().partition(" ")
            if name in self.nodes:
                out.setdefault(name, state.strip())
        return out

    def node_state(self, node: str | None = None) -> str:
        return self.node_states().get(node or self.node, "")

    def wait_node_idle(self, timeout: float = START_TIMEOUT_S,
                       nodes: Sequence[str] | None = None) -> None:
        """Wait for the nodes (default: all) to be idle, resuming any that registered
        drained or down."""
        wanted = list(nodes or self.nodes)
        last_resume = 0.0
        states: dict[str, str] = {}

        def idle() -> bool:
            nonlocal last_resume, states
            self._check_alive()
            states = self.node_states()
            bad = [n for n in wanted if states.get(n, "").startswith(("drain", "down", "inval"))]
            if bad and time.monotonic() > last_resume:
                self.run(["scontrol", "update", f"nodename={','.join(bad)}", "state=resume"],
                         check=False)
                last_resume = time.monotonic() + 2
            return all(states.get(n) == "idle" for n in wanted)

        if not wait_for(idle, timeout, 0.2):
            shown = ", ".join(f"{n} {states.get(n) or 'unknown'}" for n in wanted)
            raise ServiceError("slurmd", f"nodes not idle after {timeout:.0f}s ({shown})",
                               str(self.log_dir), self.log_tails(3))

    def _check_alive(self) -> None:
        for service in self._group().services:
            if service.name in self.procs and service.process.poll() is not None:
                raise ServiceError(service.name, f"exited with status "
                                   f"{service.process.returncode}", str(service.log),
                                   self.log_tails(3))

    def drain_jobs(self, timeout: float = 15.0) -> None:
        """Cancel every job and wait for the queue to empty (epilogs done)."""
        self.run(["scancel", "-u", "root"], check=False)
        wait_for(lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False)
                 .stdout.strip(), timeout, 0.3)

    def stop(self) -> None:
        """Cancel jobs and stop the daemons this cluster started (safe after a failed start)."""
        group = self._group()
        names = {s.name for s in group.services if s.process.poll() is None}
        if "slurmctld" in names:
            with contextlib.suppress(SlurmCommandFailed):
                self.drain_jobs()
        for name in [self.slurmd_service(n) for n in self.nodes] + ["slurmctld", "munged"]:
            group.stop(name)

    def reconfigure(self, job_submit: bool) -> None:
        """Rewrite slurm.conf with the Lua plugin on or off and tell slurmctld."""
        self.conf.write_text(self.slurm_conf_text(job_submit=job_submit))
        self.run(["scontrol", "reconfigure"])
        self.wait_node_idle()

    # ---------------------------------------------------------------- clients
    def run(self, argv: Sequence[str], check: bool = True,
            timeout: float = 30) -> RunResult:
        """Run a Slurm client command against this cluster."""
        assert self.runner is not None
        res = self.runner.run(list(argv), timeout_s=timeout)
        if check and res.returncode != 0:
            raise SlurmCommandFailed(list(argv), f"exited {res.returncode}", res.stderr)
        return res

    def sbatch(self, args: Sequence[str], wrap: str = "true", check: bool = True) -> RunResult:
        """Submit a job; `--parsable` output carries the id (see `job_id_of`)."""
        argv = ["sbatch", "--parsable", f"--output={self.out_dir}/%j.out", *args,
                f"--wrap={wrap}"]
        return self.run(argv, check=check)

    def submit(self, args: Sequence[str], wrap: str = "true") -> str:
        return job_id_of(self.sbatch(args, wrap))

    def show_job(self, job_id: str, detail: bool = True) -> str:
        argv = ["scontrol", "show", "job", "-o"] + (["-d"] if detail else []) + [job_id]
        return self.run(argv).stdout

    def job_field(self, job_id: str, key: str) -> str:
        """One `Key=value` field of `scontrol show job` ('' when absent)."""
        for token in self.show_job(job_id).split():
            if token.startswith(key + "="):
                return token.split("=", 1)[1]
        return ""

    def job_state(self, job_id: str) -> str:
        state = self.job_field(job_id, "JobState")
        if not state:
            raise SlurmCommandFailed(["scontrol", "show", "job", job_id], "printed no JobState")
        return state

    def wait_job(self, job_id: str, states: Sequence[str] = ("COMPLETED",),
                 timeout: float = 60) -> str:
        """Wait until the job reaches one of `states` (or any final state) and return it."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states or state in FINAL_STATES:
                return state
            time.sleep(0.2)
        raise ServiceError("slurmctld", f"job {job_id} still {state} after {timeout:.0f}s",
                           str(self.log_dir / "slurmctld.log"), self.log_tails(3))

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(p for p in self.log_dir.rglob("*") if p.is_file()):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name}: " + " | ".join(text))
        return "\n".join(parts)


def job_id_of(res: RunResult) -> str:
    """The job id from `sbatch --parsable` output (`ID` or `ID;cluster`)."""
    first = res.stdout.strip().split(";")[0]
    if not first.isdigit():
        raise SlurmCommandFailed(list(res.argv), f"printed no job id ({res.stdout.strip()!r})",
                                 res.stderr)
    return first
