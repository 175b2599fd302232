"""The demo's multi-node story: one job across three real slurmd, and the head node's night.

An `sbatch -N3` training job is capped on every node by that node's own sparkd;
a request that would push one node past its power budget (n2 sits on a smaller
4 kW feed) is refused by Slurm at once, with the node's budget shown to be the
reason, and never reaches a GPU; the job ends and every node restores. Then the
head node (the controller's namespace) collects every host's ledger over ssh,
the controller's included (its sparkd recorded the submit-time denials),
witnesses their checkpoints and merges them, and the job's audit from the
cluster ledger shows its whole story on all three nodes, every record verified.
"""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING

from spark_slurm.errors import SparkError
from spark_slurm.head.audit import audit_job

if TYPE_CHECKING:
    from spark_slurm.demo.scenarios import Scenario

JOB_W, JOB_GPUS = 1400, 2          # per node: 700 W per GPU, the training class's maximum
PROBE_W, PROBE_GPUS = 2800, 4      # fits the GPUs n2 has left, not the power
SMALL_NODE = "n2"


def _gres_used(sc: Scenario, node: str) -> str:
    res = sc.stack.cluster.run(["scontrol", "show", "node", "-d", node])
    for token in res.stdout.split():
        if token.startswith("GresUsed="):
            return token.split("=", 1)[1]
    return ""


def run_multi_node(sc: Scenario) -> None:
    st = sc.stack
    names = [n.name for n in st.nodes]
    seconds = st.facility_before_s + st.facility_after_s + 8
    job = sc.submit("demo-multinode", [f"-N{len(names)}",
                                       f"--gres=gpu:{JOB_GPUS},gpupower:{JOB_W}",
                                       "--comment=spark:class=training"], seconds, pin=False)
    state = st.cluster.wait_job(job, ("RUNNING",), timeout=60)
    if state != "RUNNING":
        raise SparkError(f"job {job} is {state}, not RUNNING")
    ctx = sc.context.get(job)
    held = {n.name: ctx.gpus_on(n.name) for n in st.nodes}
    caps = {n.name: n.find_records("cap", job, timeout=30) for n in st.nodes}
    per_gpu = JOB_W // JOB_GPUS
    for node in st.nodes:
        node.set_load(0.8, held[node.name])
    sc.check(f"job spans all {len(names)} nodes", sorted(ctx.node_gpus) == sorted(names),
             f"Slurm placed it on {','.join(sorted(ctx.node_gpus))}")
    for node in st.nodes:
        cap = caps[node.name]
        limits = node.limits_w()
        granted = cap[0].body.get("decision", {}).get("granted_mw") if cap else None
        sc.check(f"{node.name}: capped by its own sparkd",
                 bool(cap) and granted == per_gpu * 1000 and len(held[node.name]) == JOB_GPUS
                 and all(limits[g] == per_gpu for g in held[node.name]),
                 f"cap PER seq {cap[0].seq if cap else '-'} on {node.name}'s ledger, GPUs "
                 f"{held[node.name]} at {sorted({limits[g] for g in held[node.name]})} W")
    small = st.cluster.budget_w(SMALL_NODE)
    argv = ["salloc", "--immediate", "-J", "demo-over-budget", "-w", SMALL_NODE,
            f"--gres=gpu:{PROBE_GPUS},gpupower:{PROBE_W}", "true"]
    used = _gres_used(sc, SMALL_NODE)
    res = subprocess.run(argv, env=st.cluster.env, capture_output=True, text=True, timeout=60,
                         check=False)
    said = next((line for line in res.stderr.splitlines() if "error" in line),
                res.stderr.strip().replace("\n", " | "))
    sc.say(f"  {' '.join(argv)}  -> {said}")
    sc.check(f"a request past {SMALL_NODE}'s {small} W budget is refused at once",
             res.returncode != 0 and "Unable to allocate resources" in said,
             f"{SMALL_NODE} holds {used}: {JOB_W} + {PROBE_W} W > {small} W, while "
             f"{8 - JOB_GPUS} of its GPUs are free; Slurm: {said}")
    sc.check("the refused request never reached a GPU", not [
        r for r in st.node(SMALL_NODE).records() if r.kind == "cap"
        and (r.body.get("context") or {}).get("job_name") == "demo-over-budget"],
        f"no cap PER for it on {SMALL_NODE}")
    end = st.cluster.wait_job(job, timeout=90)
    for node in st.nodes:
        node.set_load(0.0, held[node.name])
    sc.check("job completed", end == "COMPLETED", f"job {job} ended {end}")
    for node in st.nodes:
        restore = node.find_records("restore", job, timeout=30)
        sc.check(f"{node.name}: epilog restore recorded", bool(restore),
                 f"seq {restore[0].seq}" if restore else "no restore PER")
    st.settle()

    started = time.monotonic()
    run = st.collect()
    took = time.monotonic() - started
    fetched = [n["node"] for n in run.report.get("nodes", []) if n["fetched"]]
    sc.say(f"  sparkctl collect (head node {st.controller.name}, over ssh) -> exit "
           f"{run.returncode} in {took:.1f} s")
    for n in run.report.get("nodes", []):
        clock = n.get("clock") or {}
        sc.say(f"    {n['node']:<4} {n['bytes'] // 1024} KiB, witness {n['witness']}, clock "
               f"{clock.get('offset_ns', 0) / 1e9:+.1f} s (±"
               f"{clock.get('uncertainty_ns', 0) / 1e9:.1f} s)")
    hosts = [h.name for h in st.hosts]
    sc.check("every node's ledger collected over ssh and witnessed, the controller's too",
             run.returncode == 0 and sorted(fetched) == sorted(hosts) and all(
                 n["witness"] in ("accepted", "unchanged") for n in run.report["nodes"]),
             f"fetched {','.join(fetched)}; problems: {run.report.get('problems') or 'none'}")
    merge = run.report.get("merge") or {}
    sc.check("merged on the head node with no findings",
             bool(merge.get("ok")) and {r["node"] for r in merge.get("nodes", [])} == set(hosts),
             f"+{merge.get('appended')} records into {st.cluster_db.name}")
    report = audit_job(st.cluster_db, job, keys_dir=st.trust_dir)
    on = sorted({e.node for e in report.timeline})
    kinds = {name: [e.kind for e in report.timeline if e.node == name] for name in names}
    sc.check("audit from the cluster ledger shows the job on every node",
             on == sorted(names) and all("cap" in k and "restore" in k for k in kinds.values()),
             "; ".join(f"{n}: {' '.join(k)}" for n, k in kinds.items()))
    sc.check("every record of the job verified (chain, inclusion proof or chain, MAC)",
             report.ok and all(e.verification.ok for e in report.timeline),
             f"{len(report.timeline)} records; " + ("; ".join(report.problems) or "no problems"))
