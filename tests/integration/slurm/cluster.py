"""A throwaway single-node Slurm cluster in a temporary directory, for real tests.

Starts munged (own key and socket), slurmctld and slurmd in the foreground as
child processes, with every path (state, spool, logs, pids) inside one
directory and random free ports, so several clusters can live on one machine.
GPUs are plain files named /dev/nvidiaN inside the directory; `gpupower` is a
count-only GRES in watts per node. Everything is torn down by `stop()`, which
is safe to call after a failed start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port the kernel just handed out (bind port 0), for a daemon to reuse."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ClusterError(RuntimeError):
    """The throwaway cluster did not come up; the message carries the log tails."""


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
    partitions: Sequence[str] = ("gpu", "debug")


@dataclass
class SlurmCluster:
    """A running (or stopped) cluster; `env` is what Slurm client commands need."""

    root: Path
    spec: ClusterSpec = field(default_factory=ClusterSpec)
    node: str = field(default_factory=socket.gethostname)
    name: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = "spk" + os.urandom(3).hex()
        self.conf_dir = self.root / "etc"
        self.conf = self.conf_dir / "slurm.conf"
        self.dev_dir = self.root / "dev"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.out_dir = self.root / "out"
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))]:
            if var != "SLURM_CONF":
                del self.env[var]

    # ----------------------------------------------------------------- config
    def gpu_devices(self) -> list[Path]:
        return [self.dev_dir / f"nvidia{i}" for i in range(self.spec.gpus)]

    def slurm_conf_text(self) -> str:
        """The slurm.conf; the Lua plugin is on when the spec names its files."""
        spec, r = self.spec, self.root
        use_lua = bool(spec.job_submit_files)
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
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
        lines.append(
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={spec.cpus} RealMemory=1000 "
            f"Gres=gpu:{self._typed()}{spec.gpus},gpupower:{spec.gpupower_w} State=UNKNOWN"
        )
        for i, part in enumerate(spec.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(
                f"PartitionName={part} Nodes={self.node} Default={default} "
                "MaxTime=INFINITE State=UP OverSubscribe=NO"
            )
        return "\n".join(lines) + "\n"

    def _typed(self) -> str:
        return f"{self.spec.gpu_type}:" if self.spec.gpu_type else ""

    def gres_conf_text(self) -> str:
        last = self.spec.gpus - 1
        typed = f"Type={self.spec.gpu_type} " if self.spec.gpu_type else ""
        return (
            f"Name=gpu {typed}File={self.dev_dir}/nvidia[0-{last}]\n"
            f"Name=gpupower Count={self.spec.gpupower_w} Flags=CountOnly\n"
        )

    # ------------------------------------------------------------- lifecycle
    def start(self) -> SlurmCluster:
        """Write the configuration, start the daemons and wait for an idle node."""
        for sub in ("etc", "dev", "log", "state", "spool", "run", "munge", "out"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        for dev in self.gpu_devices():
            dev.touch()
        for src in self.spec.job_submit_files:
            shutil.copy(src, self.conf_dir / Path(src).name)
        (self.conf_dir / "gres.conf").write_text(self.gres_conf_text())
        for attempt in range(3):   # a free port can be taken by someone else before we bind
            self.ctld_port = free_port()
            self.slurmd_port = free_port()
            self.conf.write_text(self.slurm_conf_text())
            try:
                if "munged" not in self.procs:
                    self._start_munge()
                self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
                self._wait(lambda: self._run_ok(["scontrol", "ping"]), "slurmctld to answer")
                self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
                self.wait_node_idle()
                return self
            except ClusterError:
                if attempt == 2 or not self._lost_a_port():
                    self.stop()
                    raise
                self._stop_slurm()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _lost_a_port(self) -> bool:
        text = self.log_tails(lines=40)
        return "Address already in use" in text or "Unable to bind" in text

    def _stop_slurm(self) -> None:
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        m = self.root / "munge"
        self._spawn("munged", [
            "munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={m / 'munged.pid'}", f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}", "--num-threads=4",
        ])
        self._wait(self.munge_socket.exists, "munged's socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = (self.log_dir / f"{name}.stdout").open("wb")
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        out.close()

    def _run_ok(self, argv: list[str]) -> bool:
        res = subprocess.run(argv, env=self.env, capture_output=True, timeout=20, check=False)
        return res.returncode == 0

    def _wait(self, cond: Callable[[], bool], what: str,
              timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited ({proc.returncode}) waiting for "
                                       f"{what}:\n{self.log_tails()}")
            if cond():
                return
            time.sleep(0.2)
        raise ClusterError(f"timed out waiting for {what}:\n{self.log_tails()}")

    def node_state(self) -> str:
        res = self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False)
        return res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""

    def wait_node_idle(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait for the node to be idle, resuming it if it registered drained/down."""
        last_resume = 0.0

        def idle() -> bool:
            nonlocal last_resume
            state = self.node_state()
            if state == "idle":
                return True
            if state.startswith(("drain", "down", "inval")) and time.monotonic() > last_resume:
                self.run(["scontrol", "update", f"nodename={self.node}", "state=resume"],
                         check=False)
                last_resume = time.monotonic() + 2
            return False

        self._wait(idle, "the node to be idle", timeout)

    def stop(self) -> None:
        """Cancel jobs, stop every daemon this cluster started, and forget its files."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "-u", "root"], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                res = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()

    # ---------------------------------------------------------------- clients
    def run(self, argv: list[str], check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return res

    def sbatch(self, args: Sequence[str], wrap: str = "true",
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Submit a job; `--parsable` output carries the id (see `job_id_of`)."""
        argv = ["sbatch", "--parsable", f"--output={self.out_dir}/%j.out", *args,
                f"--wrap={wrap}"]
        return self.run(argv, check=check)

    def submit(self, args: Sequence[str], wrap: str = "true") -> str:
        return job_id_of(self.sbatch(args, wrap))

    def show_job(self, job_id: str, detail: bool = True) -> str:
        argv = ["scontrol", "show", "job", "-o"] + (["-d"] if detail else []) + [job_id]
        return self.run(argv).stdout

    def job_state(self, job_id: str) -> str:
        out = self.show_job(job_id, detail=False)
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        raise ClusterError(f"no JobState for job {job_id} in: {out!r}")

    def wait_job(self, job_id: str, states: Sequence[str] = ("COMPLETED",),
                 timeout: float = 60) -> str:
        """Wait until the job reaches one of `states` (or any final state) and return it."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL",
                 "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE"}
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states or state in final:
                return state
            time.sleep(0.2)
        raise ClusterError(f"job {job_id} still {state} after {timeout:.0f}s:\n"
                           f"{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def job_id_of(res: subprocess.CompletedProcess[str]) -> str:
    """The job id from `sbatch --parsable` output (`ID` or `ID;cluster`)."""
    first = res.stdout.strip().split(";")[0]
    if not first.isdigit():
        raise ClusterError(f"sbatch printed no job id: {res.stdout!r} {res.stderr!r}")
    return first
