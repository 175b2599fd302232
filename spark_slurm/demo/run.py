"""`sparkctl demo`: bring the whole system up, run the scenarios, prove the result, clean up.

The library entry point behind the command and the integration test. Output is
a stream of timestamped lines through `say`; the outcome is a `DemoResult`
whose `ok` is true only when every scenario's checks and every end-of-run check
(audits, plots, both ledger verifiers, metrics) passed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spark_slurm.demo import netns
from spark_slurm.demo.report import audit_jobs, verify_both
from spark_slurm.demo.saved import STATE_FILE, stop_saved
from spark_slurm.demo.scenarios import MIN_NODES, SCENARIOS, Check, ScenarioResult, run_scenario
from spark_slurm.demo.stack import ClusterStack, StackSpec, find_repo
from spark_slurm.errors import InputError, SparkError

Say = Callable[[str], None]
RUNTIME_DIRS = ("slurm", "sim", "run", "spool", "lua", "bin", "ssh")
DEFAULT_NODES = 3
SMALL_FEED_W = {"n2": 4000}   # n2 sits on a smaller power feed (the multi-node story)


@dataclass
class DemoResult:
    workdir: Path
    scenarios: list[ScenarioResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    kept: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.scenarios) and all(s.ok for s in self.scenarios) and all(
            c.ok for c in self.checks)

    def failures(self) -> list[str]:
        out = [f"{s.name}: {c.name} ({c.detail})" for s in self.scenarios for c in s.failed()]
        if any(not s.checks for s in self.scenarios):
            out += [f"{s.name}: no checks ran" for s in self.scenarios if not s.checks]
        return out + [f"{c.name} ({c.detail})" for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "workdir": str(self.workdir), "kept": self.kept,
                "scenarios": [s.to_json() for s in self.scenarios],
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                           for c in self.checks],
                "plots": [str(p) for p in self.plots]}


def stamped(say: Say) -> Say:
    """Prefix every line with the wall-clock time, so the run reads as a log."""
    def out(line: str) -> None:
        say(f"{dt.datetime.now().strftime('%H:%M:%S')} {line}")
    return out


def choose(names: Sequence[str], nodes: int | None = None) -> list[str]:
    """The scenarios to run, in the canonical order; unknown names are a usage error.
    With `nodes`, all (no names) means those that fit that many nodes; naming one that
    needs more is a usage error."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise InputError(f"unknown scenario {unknown[0]!r} (choose from "
                         f"{', '.join(SCENARIOS)}, or none for all)")
    if nodes is not None:
        big = [n for n in names if MIN_NODES.get(n, 1) > nodes]
        if big:
            raise InputError(f"scenario {big[0]!r} needs --nodes {MIN_NODES[big[0]]} or more "
                             f"(this run has {nodes})")
        return [n for n in SCENARIOS if (n in names if names else MIN_NODES.get(n, 1) <= nodes)]
    return [n for n in SCENARIOS if not names or n in names]


def node_count(asked: int | None, say: Say,
               probe: Callable[[], str | None] = netns.unavailable_reason) -> int:
    """How many nodes this run gets: as asked, else 3 where network namespaces work and 1
    (said so, with the reason `probe` gives) where they do not."""
    if asked is not None:
        if asked < 1:
            raise InputError(f"--nodes must be at least 1, not {asked}")
        if asked > 1:
            reason = probe()
            if reason is not None:
                raise InputError(f"--nodes {asked} needs network namespaces: {reason}")
        return asked
    reason = probe()
    if reason is None:
        return DEFAULT_NODES
    say(f"note: a multi-node cluster needs network namespaces ({reason}); "
        "running on one node, without the multi-node scenario")
    return 1


def preflight() -> None:
    """Refuse early, with the reason, where a real cluster cannot run."""
    if os.geteuid() != 0:
        raise InputError("sparkctl demo needs root (slurmd and the prolog run as root); "
                         "run it as root, e.g. `sudo make demo`")
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "sqlite3", "openssl")
               if shutil.which(t) is None]
    if missing:
        raise InputError(f"sparkctl demo: {', '.join(missing)} not installed "
                         "(`make system-deps` installs them)")


def _metrics(url: str, names: Sequence[str]) -> Check:
    """The endpoint answers and carries samples of each named metric."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback URL)
            text = resp.read().decode(errors="replace")
    except OSError as exc:
        return Check(f"Prometheus endpoint {url}", False, str(exc))
    counts = {n: sum(1 for line in text.splitlines() if line.startswith(n)) for n in names}
    return Check(f"Prometheus endpoint {url}", all(counts.values()),
                 ", ".join(f"{n}: {c} samples" for n, c in counts.items()))


def prometheus_config(stack: ClusterStack) -> Path:
    """contrib/prometheus/demo-prometheus.yml with this run's ports filled in."""
    data = yaml.safe_load((stack.repo / "contrib" / "prometheus" /
                           "demo-prometheus.yml").read_text())
    targets = {"sparkd": [f"{h.address}:{h.metrics_port}" for h in stack.hosts
                          if h.metrics_port],
               "karman": [f"{stack.nodes[0].address}:{stack.exporter_port}"]
               if stack.exporter_port else []}
    for job in data.get("scrape_configs", []):
        wanted = targets.get(job.get("job_name"))
        if wanted:
            job["static_configs"] = [{"targets": wanted}]
    out = stack.root / "prometheus.yml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def keep_instructions(stack: ClusterStack) -> list[str]:
    r = stack.root
    lines = [
        "the cluster is still running (--keep); in another shell:",
        f"  export SLURM_CONF={stack.cluster.conf}",
        "  sbatch --gres=gpu:2,gpupower:800 --comment=spark:class=training --wrap 'sleep 60'",
        f"  sparkctl status --socket {stack.socket}",
        f"  sparkctl cap --job JOBID --watts 300 --socket {stack.socket}",
        f"  sparkctl sim smi {stack.sim_dir}            # the GPUs, like nvidia-smi",
        f"  sparkctl audit JOBID --db {stack.ledger} --keys {stack.trust_dir}",
        f"  sparkctl verify {stack.ledger} --key {stack.hmac_key} --pubkey {stack.public_key}",
        f"  metrics: {stack.metrics_url} (sparkd), {stack.exporter_url} (Karman exporter)",
        f"  prometheus --config.file={prometheus_config(stack)}",
        "  Grafana: import contrib/grafana/sparkd-dashboard.json (Prometheus data source)"]
    if stack.topology is not None:
        exec_ = " ".join(stack.cluster.in_ns("ctl", ["bash"]))
        lines += [
            "  hosts: " + ", ".join(f"{h.name} {h.address} (socket {h.socket})"
                                    for h in stack.hosts),
            f"  a shell on the head node (the controller): {exec_}",
            f"  sbatch -N{len(stack.nodes)} --gres=gpu:2,gpupower:1400 --wrap 'srun hostname'",
            f"  sparkctl audit JOBID --db {stack.cluster_db} --keys {stack.trust_dir}"
            "   # after a collection"]
    return [*lines, f"  stop everything: sparkctl demo --stop {r}"]


def _head_audits(stack: ClusterStack, jobs: list[str], say: Say,
                 result: DemoResult) -> None:
    """Multi-node: collect every host's ledger on the head node, then audit each job
    from the merged cluster ledger; one node: audit the node's own ledger."""
    db = stack.ledger
    if stack.topology is not None:
        say("== the head node collects, witnesses and merges every ledger (over ssh)")
        run = stack.collect()
        fetched = [n["node"] for n in run.report.get("nodes", []) if n["fetched"]]
        check = Check("head node collection (sparkctl collect --cosign --into)",
                      run.returncode == 0 and len(fetched) == len(stack.hosts),
                      f"collected {', '.join(fetched)} into {stack.cluster_db}; problems: "
                      f"{'; '.join(run.report.get('problems', [])) or 'none'}")
        result.checks.append(check)
        say(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name} — {check.detail}")
        db = stack.cluster_db
    say(f"== audit of every demo job (sparkctl audit --db {db.name} --keys)")
    expected = {j: p for s in result.scenarios for j, p in s.expected_problems.items()}
    checks, result.plots = audit_jobs(db, jobs, stack.plots, say, stack.trust_dir,
                                      expected=expected)
    result.checks += checks


def run_demo(names: Sequence[str] = (), workdir: Path | None = None, keep: bool = False,
             say: Say = print, nodes: int | None = None) -> DemoResult:
    """Start everything, run the chosen scenarios, audit, verify, plot; stop unless `keep`.
    `nodes`: compute nodes (default 3 where network namespaces work, else 1)."""
    choose(names)
    if nodes is not None and nodes < 1:
        raise InputError(f"--nodes must be at least 1, not {nodes}")
    preflight()
    say = stamped(say)
    count = node_count(nodes, say)
    chosen = choose(names, count)
    for name in [n for n in SCENARIOS if not names and n not in chosen]:
        say(f"note: scenario {name} needs {MIN_NODES[name]} nodes; this run has {count}")
    if workdir is not None and (workdir / STATE_FILE).exists():
        raise InputError(f"{workdir}: a demo is already running there "
                         f"(sparkctl demo --stop {workdir})")
    root = (workdir or Path(tempfile.mkdtemp(prefix="spark-demo-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    result = DemoResult(root)
    spec = StackSpec(nodes=count, node_budgets_w=SMALL_FEED_W if count >= 3 else {})
    stack = ClusterStack(root, find_repo(Path.cwd()), spec)
    say(f"workdir {root}")
    where = ("on this host" if count == 1 else
             f"on {count} nodes and a controller, each in its own network namespace")
    say(f"starting munge, slurmctld, slurmd {where} (8 x B200 sim GPUs, gpupower "
        f"{spec.budget_w} W per node), Karman sim stream, sparkd, Karman exporter ...")
    started = time.monotonic()
    stack.start()
    try:
        hosts = ", ".join(f"{h.name} {h.address}" for h in stack.hosts)
        say(f"all services up in {time.monotonic() - started:.1f} s: {hosts}; first node "
            f"{stack.cluster.node}, socket {stack.socket}, Karman {stack.karman_endpoint}")
        for name in chosen:
            say(f"== scenario {name}: {SCENARIOS[name][0]}")
            res = run_scenario(name, stack, say)
            # the rack meter sees every GPU: let this story's facility windows close
            # before the next one moves power, or its follow-ups would see both
            stack.settle(stack.facility_after_s + 5)
            result.scenarios.append(res)
            say(f"== scenario {name}: {'PASSED' if res.ok else 'FAILED'} "
                f"({(res.ended_ns - res.started_ns) / 1e9:.1f} s)")
        say("== Prometheus endpoints")
        endpoints = (
            (stack.metrics_url,
             ("spark_gpu_power_watts", "spark_pers_total", "spark_ledger_head_seq")),
            (stack.exporter_url, ("karman_real_power_watts",)))
        for url, wanted in endpoints:
            check = _metrics(url, wanted)
            result.checks.append(check)
            say(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name} — {check.detail}")
        _head_audits(stack, [j for s in result.scenarios for j in s.job_ids], say, result)
        say(f"== ledger verification ({stack.cluster.node})")
        result.checks += verify_both(stack.ledger, root / "results" / "ledger.db",
                                     stack.hmac_key, stack.public_key,
                                     stack.repo / "contrib" / "verify-ledger.sh")
        for c in result.checks[-2:]:
            say(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name} — {c.detail}")
        if keep:
            result.kept = True
            for line in keep_instructions(stack):
                say(line)
    except SparkError as exc:
        result.checks.append(Check("demo ran to the end", False, exc.message))
    finally:
        (root / "results").mkdir(exist_ok=True)
        (root / "results" / "demo.json").write_text(json.dumps(result.to_json(), indent=2))
        if not result.kept:
            say("stopping every service ...")
            stack.stop()
            _tidy(root)
            say(f"stopped; ledgers, keys, plots, logs and results kept in {root}")
    return result


def _tidy(root: Path) -> None:
    """Remove what only the running stack needed; ledgers, keys and logs stay."""
    tops = [root, *sorted((root / "nodes").glob("*"))]
    for top in tops:
        for sub in RUNTIME_DIRS:
            for path in (top / sub).glob("*") if sub == "slurm" else [top / sub]:
                if path.name != "log":  # Slurm's own logs stay with the results
                    shutil.rmtree(path, ignore_errors=True)


def stop_demo(workdir: Path) -> list[str]:
    """`sparkctl demo --stop DIR`: stop a demo left running with --keep."""
    return stop_saved(workdir.resolve())
