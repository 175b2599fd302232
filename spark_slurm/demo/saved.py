"""A stack left running (`sparkctl demo --keep`): its state file, and stopping it later.

`demo.json` in the stack's directory records every service's pid, the hosts'
sockets and ledgers, and (on a namespaced cluster) the namespaces, links and
holder processes. `stop_saved` works from any shell: it cancels the jobs (their
epilogs restore the GPUs), stops the services in reverse order, then kills
whatever is left inside the namespaces and deletes them and their links.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spark_slurm.demo.netns import Topology
from spark_slurm.demo.services import wait_for
from spark_slurm.errors import InputError, ServiceError

if TYPE_CHECKING:
    from spark_slurm.demo.stack import ClusterStack

STATE_FILE = "demo.json"


def save_state(stack: ClusterStack) -> None:
    """Pids, endpoints and namespaces, so `sparkctl demo --stop DIR` works from any shell."""
    first = stack.nodes[0]
    state: dict[str, Any] = {
        "root": str(stack.root), "slurm_conf": str(stack.cluster.conf),
        "socket": str(first.socket), "ledger": str(first.ledger),
        "metrics": first.metrics_url, "karman": first.karman_endpoint,
        "exporter": stack.exporter_url if stack.exporter_port else None,
        "hosts": [{"name": h.name, "address": h.address, "socket": str(h.socket),
                   "ledger": str(h.ledger), "metrics": h.metrics_url if h.metrics_port
                   else None} for h in stack.hosts],
        "head": {"cluster_db": str(stack.cluster_db), "witness": str(stack.witness_dir),
                 "trust": str(stack.trust_dir)},
        "services": [{"name": s.name, "pid": s.pid()} for s in stack.services.services],
        "topology": stack.topology.to_json() if stack.topology is not None else None}
    (stack.root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def stop_saved(root: Path, timeout_s: float = 15.0) -> list[str]:
    """Stop a stack left running with --keep, from its demo.json; returns what was stopped."""
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
    if state.get("topology"):
        topo = Topology.from_json(state["topology"])
        removed = topo.down()
        stopped += [r for r in removed if r.startswith("netns")]
        left = topo.leftovers()
        if left:
            raise ServiceError("demo", f"could not remove {', '.join(left)}", str(path))
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
