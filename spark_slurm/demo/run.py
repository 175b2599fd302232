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

from spark_slurm.daemon import client
from spark_slurm.demo.report import audit_jobs, verify_both
from spark_slurm.demo.scenarios import SCENARIOS, Check, ScenarioResult, run_scenario
from spark_slurm.demo.services import wait_for
from spark_slurm.demo.stack import STATE_FILE, DemoStack, find_repo, stop_saved
from spark_slurm.errors import InputError, SparkError

Say = Callable[[str], None]
RUNTIME_DIRS = ("slurm", "sim", "run", "spool", "lua", "bin")


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


def choose(names: Sequence[str]) -> list[str]:
    """The scenarios to run, in the canonical order; unknown names are a usage error."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise InputError(f"unknown scenario {unknown[0]!r} (choose from "
                         f"{', '.join(SCENARIOS)}, or none for all)")
    return [n for n in SCENARIOS if not names or n in names]


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


def prometheus_config(stack: DemoStack) -> Path:
    """contrib/prometheus/demo-prometheus.yml with this run's ports filled in."""
    data = yaml.safe_load((stack.repo / "contrib" / "prometheus" /
                           "demo-prometheus.yml").read_text())
    ports = {"sparkd": stack.metrics_port, "karman": stack.exporter_port}
    for job in data.get("scrape_configs", []):
        port = ports.get(job.get("job_name"))
        if port:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    out = stack.root / "prometheus.yml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def keep_instructions(stack: DemoStack) -> list[str]:
    r = stack.root
    return [
        "the cluster is still running (--keep); in another shell:",
        f"  export SLURM_CONF={stack.cluster.conf}",
        "  sbatch --gres=gpu:2,gpupower:800 --comment=spark:class=training --wrap 'sleep 60'",
        f"  sparkctl status --socket {stack.socket}",
        f"  sparkctl cap --job JOBID --watts 300 --socket {stack.socket}",
        f"  sparkctl sim smi {stack.sim_dir}            # the GPUs, like nvidia-smi",
        f"  sparkctl audit JOBID --db {stack.ledger} --keys {stack.trust_dir}",
        f"  sparkctl verify {stack.ledger} --key {stack.hmac_key} --pubkey {stack.public_key}",
        f"  metrics: {stack.metrics_url} (sparkd), "
        f"http://127.0.0.1:{stack.exporter_port}/metrics (Karman exporter)",
        f"  prometheus --config.file={prometheus_config(stack)}",
        "  Grafana: import contrib/grafana/sparkd-dashboard.json (Prometheus data source)",
        f"  stop everything: sparkctl demo --stop {r}",
    ]


def _settle(stack: DemoStack, timeout: float) -> None:
    """Wait for pending facility follow-ups, so audits see every action validated."""
    def idle() -> bool:
        return int(client.status(stack.socket).get("facility_pending", 0)) == 0
    wait_for(idle, timeout, 0.3)


def run_demo(names: Sequence[str] = (), workdir: Path | None = None, keep: bool = False,
             say: Say = print) -> DemoResult:
    """Start everything, run the chosen scenarios, audit, verify, plot; stop unless `keep`."""
    chosen = choose(names)
    preflight()
    say = stamped(say)
    if workdir is not None and (workdir / STATE_FILE).exists():
        raise InputError(f"{workdir}: a demo is already running there "
                         f"(sparkctl demo --stop {workdir})")
    root = (workdir or Path(tempfile.mkdtemp(prefix="spark-demo-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    result = DemoResult(root)
    stack = DemoStack(root, find_repo(Path.cwd()))
    say(f"workdir {root}")
    say("starting munge, slurmctld, slurmd (8 x B200 sim GPUs, gpupower 7200 W), "
        "Karman sim stream, sparkd, Karman exporter ...")
    started = time.monotonic()
    stack.start()
    try:
        say(f"all services up in {time.monotonic() - started:.1f} s: node "
            f"{stack.cluster.node}, socket {stack.socket}, Karman {stack.karman_endpoint}")
        for name in chosen:
            say(f"== scenario {name}: {SCENARIOS[name][0]}")
            res = run_scenario(name, stack, say)
            # the rack meter sees every GPU: let this story's facility windows close
            # before the next one moves power, or its follow-ups would see both
            _settle(stack, stack.facility_after_s + 5)
            result.scenarios.append(res)
            say(f"== scenario {name}: {'PASSED' if res.ok else 'FAILED'} "
                f"({(res.ended_ns - res.started_ns) / 1e9:.1f} s)")
        say("== Prometheus endpoints")
        endpoints = (
            (stack.metrics_url,
             ("spark_gpu_power_watts", "spark_pers_total", "spark_ledger_head_seq")),
            (f"http://127.0.0.1:{stack.exporter_port}/metrics", ("karman_real_power_watts",)))
        for url, wanted in endpoints:
            check = _metrics(url, wanted)
            result.checks.append(check)
            say(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name} — {check.detail}")
        jobs = [j for s in result.scenarios for j in s.job_ids]
        say("== audit of every demo job (sparkctl audit --keys)")
        checks, result.plots = audit_jobs(stack.ledger, jobs, stack.plots, say, stack.trust_dir)
        result.checks += checks
        say("== ledger verification")
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
            for sub in RUNTIME_DIRS:
                for path in (root / sub).glob("*") if sub == "slurm" else [root / sub]:
                    if path.name != "log":  # Slurm's own logs stay with the results
                        shutil.rmtree(path, ignore_errors=True)
            say(f"stopped; ledger, keys, plots, logs and results kept in {root}")
    return result


def stop_demo(workdir: Path) -> list[str]:
    """`sparkctl demo --stop DIR`: stop a demo left running with --keep."""
    return stop_saved(workdir.resolve())
