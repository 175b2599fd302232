"""One host of the cluster stack: its simulated GPUs, keys, sparkd, rack stream and ledger.

A compute node has N simulated GPUs (its own sim directory), its own ledger
keys (which the head node's trust directory lists as `<node>.pub/.hmac`), a
sparkd with the sim backend and the scontrol job context, and optionally the
Karman rack stream that its GPUs drive. The controller host has no GPUs (sparkd
with `gpu.backend: none`) and ingests job_submit.lua's denial spool. Every
process is started through `in_ns`, so on a namespaced cluster it runs inside
that host's network, UTS and mount namespaces; the daemon can be stopped,
killed with SIGKILL and restarted, or restarted with its clock shifted.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from spark_slurm.daemon import client
from spark_slurm.demo.services import ServiceGroup, wait_for
from spark_slurm.errors import DaemonUnavailable, ServiceError
from spark_slurm.gpu.sim import SimFleet
from spark_slurm.ledger.keys import HMAC_FILE, PUBLIC_FILE, SIGNING_FILE, keygen
from spark_slurm.ledger.reader import read_records
from spark_slurm.ledger.records import Record

InNs = Callable[[Sequence[str]], list[str]]
# Shifts this Python process's wall clock (time.time/time_ns; monotonic untouched) by
# SPARK_TEST_CLOCK_OFFSET_NS: how the stack skews one node's sparkd. libfaketime 0.9.10
# (Debian 12) cannot do it for Python 3.11: with CLOCK_MONOTONIC faked, timed waits
# (threading.Event.wait) overshoot by the offset; with FAKETIME_DONT_FAKE_MONOTONIC,
# time.sleep fails with EINVAL.
SKEW_SITECUSTOMIZE = '''\
import os as _os
import time as _time

_offset = int(_os.environ.get("SPARK_TEST_CLOCK_OFFSET_NS", "0"))
if _offset:
    _ns, _s = _time.time_ns, _time.time
    _time.time_ns = lambda: _ns() + _offset
    _time.time = lambda: _s() + _offset / 1e9
'''


def tool(name: str) -> list[str]:
    """argv prefix for one of our console scripts, from this interpreter's environment."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = {"sparkctl": "spark_slurm.cli", "sparkd": "spark_slurm.daemon.main"}[name]
    return [sys.executable, "-m", module]


class SparkNode:
    """Paths, processes and queries of one host's spark parts, rooted at `root`."""

    def __init__(self, name: str, root: Path, *, gpus: int, model: str,
                 services: ServiceGroup, in_ns: InNs, address: str = "127.0.0.1",
                 namespaced: bool = False, spool: Path | None = None, karman_port: int = 0,
                 metrics_port: int = 0) -> None:
        self.name = name
        self.root = root
        self.gpus = gpus
        self.model = model
        self.services = services
        self.in_ns = in_ns
        self.address = address
        self.namespaced = namespaced
        self.spool = spool
        self.karman_port = karman_port
        self.metrics_port = metrics_port
        self.sim_dir = root / "sim"
        self.keys_dir = root / "keys"
        self.state_dir = root / "spark"
        self.ledger = self.state_dir / "ledger.db"
        self.journal = self.state_dir / "journal.jsonl"
        self.run_dir = root / "run"      # /run/spark on a namespaced node
        self.socket = self.run_dir / "sparkd.sock"
        # root's and the SlurmUser's own socket: the hook uses it, so no user crowding
        # the public socket can delay a prolog (a short name: temp dirs are deep, and a
        # unix socket path has 107 bytes)
        self.scheduler_socket = self.run_dir / "sched.sock"
        self.hook_config = self.run_dir / "hook.json"
        self.daemon_config = root / "sparkd.yaml"
        self.clock_offset_s = 0.0

    # ------------------------------------------------------------------ names
    def service(self, what: str) -> str:
        return f"{what}-{self.name}" if self.namespaced else what

    @property
    def daemon_log(self) -> Path:
        return self.services.log_dir / f"{self.service('sparkd')}.log"

    @property
    def karman_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.karman_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    @property
    def hmac_key(self) -> Path:
        return self.keys_dir / HMAC_FILE

    @property
    def signing_key(self) -> Path:
        return self.keys_dir / SIGNING_FILE

    @property
    def public_key(self) -> Path:
        return self.keys_dir / PUBLIC_FILE

    # ------------------------------------------------------------------ build
    def build(self, *, policy: Path, cluster: str, trust_dir: Path,
              automations: Mapping[str, float],
              extra: Mapping[str, Any] | None = None) -> None:
        """GPUs, keys (kept across rebuilds), the head's copy of them, the configs;
        `extra` sections are merged into sparkd.yaml (a mapping merges key by key)."""
        for d in (self.state_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.gpus:
            SimFleet.init(self.sim_dir, self.gpus, self.model, force=True)
        if not self.keys_dir.exists():
            keygen(self.keys_dir)
        self.trust(trust_dir)
        self.set_hook_mode("fail_closed")
        gpu: dict[str, Any] = ({"backend": "sim", "state_dir": str(self.sim_dir)}
                               if self.gpus else {"backend": "none"})
        config: dict[str, Any] = {
            "node": self.name, "cluster": cluster, "state_dir": str(self.state_dir),
            "ledger": str(self.ledger), "policy": str(policy),
            "socket": {"path": str(self.socket), "scheduler_path": str(self.scheduler_socket)},
            "keys": {"hmac": str(self.hmac_key), "signing": str(self.signing_key)},
            "gpu": gpu, "job_context": {"source": "scontrol"},
            "journal_path": str(self.journal), "automations": dict(automations)}
        if self.spool is not None:
            config["spool_path"] = str(self.spool)
        if self.karman_port:
            config["karman"] = {"endpoint": self.karman_endpoint}
        if self.metrics_port:
            config["metrics"] = {"address": self.address, "port": self.metrics_port}
        for section, value in (extra or {}).items():
            have = config.get(section)
            config[section] = ({**have, **value} if isinstance(have, dict)
                               and isinstance(value, Mapping) else value)
        self.daemon_config.write_text(yaml.safe_dump(config, sort_keys=False))

    def trust(self, trust_dir: Path) -> None:
        """Install this node's current public and HMAC keys in the head's trust dir."""
        trust_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src, suffix in ((self.public_key, "pub"), (self.hmac_key, "hmac")):
            dest = trust_dir / f"{self.name}.{suffix}"
            shutil.copyfile(src, dest)
            dest.chmod(0o600)

    def set_hook_mode(self, mode: str, timeout_s: float = 5.0) -> None:
        """Rewrite the hook config; the wrappers read it on every run."""
        self.hook_config.write_text(json.dumps({
            "socket": str(self.scheduler_socket), "journal": str(self.journal),
            "timeout_s": timeout_s, "on_daemon_down": mode}))

    # -------------------------------------------------------------- processes
    def start_karman(self) -> None:
        if not self.karman_port:
            return
        port = self.karman_port
        self.services.start(self.service("karman-sim"), self.in_ns([
            *tool("sparkctl"), "karman", "sim", "--gpus", str(self.sim_dir),
            "--bind", self.karman_endpoint]),
            ready=lambda: self._ns_port_open(port))

    def _ns_port_open(self, port: int) -> bool:
        """A TCP port listening in this host's network namespace (per /proc/net/tcp)."""
        pids = [s.pid() for s in self.services.services if s.name == self.service("karman-sim")]
        if not pids:
            return False
        try:
            table = Path(f"/proc/{pids[0]}/net/tcp").read_text()
        except OSError:
            return False
        rows = [line.split() for line in table.splitlines()[1:]]
        return any(len(r) > 3 and r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows)

    def start_daemon(self, wait: bool = True, timeout_s: float = 60.0,
                     clock_offset_s: float = 0.0) -> None:
        """Start sparkd (optionally with its wall clock shifted by `clock_offset_s`)."""
        env: dict[str, str] = {}
        self.clock_offset_s = clock_offset_s
        if clock_offset_s:
            skew = self.root / "skew"
            skew.mkdir(exist_ok=True)
            (skew / "sitecustomize.py").write_text(SKEW_SITECUSTOMIZE)
            env = {"PYTHONPATH": str(skew),
                   "SPARK_TEST_CLOCK_OFFSET_NS": str(int(clock_offset_s * 1e9))}
        self.services.start(self.service("sparkd"), self.in_ns(
            [*tool("sparkd"), "--config", str(self.daemon_config)]), env=env)
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        name = self.service("sparkd")
        proc = next((s.process for s in self.services.services if s.name == name), None)

        def up() -> bool:
            if proc is None or proc.poll() is not None:
                raise ServiceError(name, "exited" if proc else "not started",
                                   str(self.daemon_log), self.log_tail(5))
            return self.answering()

        if not wait_for(up, timeout_s, 0.1):
            raise ServiceError(name, f"not answering after {timeout_s:.0f}s",
                               str(self.daemon_log), self.log_tail(5))

    def answering(self) -> bool:
        try:
            client.status(self.socket)
        except DaemonUnavailable:
            return False
        return True

    def stop_daemon(self) -> None:
        self.services.stop(self.service("sparkd"), timeout_s=15.0)

    def kill_daemon(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown code runs."""
        self.services.stop(self.service("sparkd"), sig=signal.SIGKILL)

    def daemon_pid(self) -> int | None:
        return next((s.pid() for s in self.services.services
                     if s.name == self.service("sparkd") and s.alive()), None)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sparkd log)"

    # ---------------------------------------------------------------- queries
    def status(self) -> dict[str, Any]:
        return client.status(self.socket)

    def ingest(self) -> dict[str, Any]:
        """Ask sparkd to ingest the denial spool and the journal now."""
        return client.checked(client.request({"op": "ingest"}, self.socket, 30.0))

    def fleet(self) -> SimFleet:
        return SimFleet.open(self.sim_dir)

    def set_load(self, util: float, gpus: list[int] | None = None) -> None:
        """The simulated workload: what a job's kernels would make the GPUs draw."""
        fleet = self.fleet()
        for g in gpus if gpus is not None else list(range(self.gpus)):
            fleet.set_load(util, g)

    def limits_w(self) -> dict[int, int]:
        """Each GPU's enforced limit in watts, read from the sim state (as nvidia-smi)."""
        fleet = self.fleet()
        return {i: fleet.limits(i).enforced_mw // 1000 for i in range(self.gpus)}

    def wait_limits(self, expect: dict[int, int], timeout: float = 30) -> dict[int, int]:
        seen: dict[int, int] = {}

        def match() -> bool:
            nonlocal seen
            seen = self.limits_w()
            return all(seen.get(i) == w for i, w in expect.items())

        if not wait_for(match, timeout, 0.2):
            raise ServiceError(self.service("sparkd"), f"sim limits {seen}, expected {expect}",
                               str(self.daemon_log), self.log_tail(5))
        return seen

    def records(self, job_id: str | None = None) -> list[Record]:
        if not self.ledger.exists():
            return []
        return list(read_records(self.ledger, job_id=job_id))

    def kinds(self, job_id: str) -> list[str]:
        return [r.kind for r in self.records(job_id)]

    def find_records(self, kind: str | None, job_id: str | None = None, count: int = 1,
                     timeout: float = 30, match: Mapping[str, Any] | None = None
                     ) -> list[Record]:
        """Records of `kind` (None: any; body fields equal to `match`) once `count` exist;
        what was found, possibly fewer, after `timeout`."""
        found: list[Record] = []

        def enough() -> bool:
            nonlocal found
            found = [r for r in self.records(job_id) if (kind is None or r.kind == kind)
                     and all(r.body.get(k) == v for k, v in (match or {}).items())]
            return len(found) >= count

        wait_for(enough, timeout, 0.2)
        return found

    def wait_records(self, job_id: str | None, kind: str | None, count: int = 1,
                     timeout: float = 30) -> list[Record]:
        """Like `find_records`, but too few after `timeout` is an error naming what is there."""
        found = self.find_records(kind, job_id, count, timeout)
        if len(found) < count:
            raise ServiceError(self.service("sparkd"), f"job {job_id}: {len(found)} {kind} "
                               f"PER(s) after {timeout}s; have "
                               f"{self.kinds(job_id) if job_id else '?'}",
                               str(self.daemon_log), self.log_tail(10))
        return found
