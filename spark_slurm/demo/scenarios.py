"""The demo's stories, each run as real `sbatch` jobs and each asserting its outcome.

A scenario drives the cluster the way users and operators would (sbatch,
`sparkctl sim fault`, `sparkctl sim smi -pl`, `sparkctl cap`), then checks what
the ledger, the GPUs, the rack's facility stream and Slurm say happened. Every
check is recorded, passed or not, so a failure names exactly which promise
broke; an error that stops a scenario early is itself a failed check, never a
traceback. The Karman reference stories live in karman_stories.py, the
post-incident investigation in incident.py, the multi-node story in
multinode.py; this module holds the others and the registry.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spark_slurm.demo import incident, karman_stories
from spark_slurm.demo.services import wait_for
from spark_slurm.demo.stack import ClusterStack
from spark_slurm.errors import SparkError
from spark_slurm.head.audit import audit_job, summarize
from spark_slurm.head.replay import replay
from spark_slurm.ledger.records import Record
from spark_slurm.slurm import SubprocessRunner, open_context_source

Say = Callable[[str], None]
THRESHOLD_MC, RELEASE_MC = 87_000, 80_000   # etc/policy.yaml thermal section


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ScenarioResult:
    """What one scenario did and whether each of its promises held."""

    name: str
    title: str
    job_ids: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    started_ns: int = 0
    ended_ns: int = 0
    # job -> the audit problems its story causes on purpose (the incident): the end-of-run
    # audit of that job passes when it finds exactly these, and no other
    expected_problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "ok": self.ok, "jobs": self.job_ids,
                "started_ns": self.started_ns, "ended_ns": self.ended_ns,
                "expected_problems": self.expected_problems,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail}
                           for c in self.checks]}


class Scenario:
    """Helpers shared by the scenarios: jobs, waits, and recorded checks."""

    def __init__(self, stack: ClusterStack, result: ScenarioResult, say: Say) -> None:
        self.stack = stack
        self.result = result
        self.say = say
        self.context = open_context_source("scontrol",
                                           runner=SubprocessRunner(stack.cluster.env))

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.result.checks.append(Check(name, bool(ok), detail))
        self.say(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f" — {detail}" if detail else ""))
        return bool(ok)

    def submit(self, name: str, args: list[str], seconds: float, pin: bool = True,
               until: Path | None = None) -> str:
        """sbatch a job; on a multi-node cluster it is pinned to the first node (whose
        GPUs, ledger and stream the single-node stories read) unless `pin` is off.
        It sleeps `seconds`, or with `until` ends as soon as that file exists (at most
        `seconds`): a story with timed steps then never outlives its job on a slow host."""
        pinned = ["-w", self.stack.cluster.node] if pin and self.stack.namespaced else []
        wrap = f"sleep {seconds:g}" if until is None else (
            f"for i in $(seq {int(seconds * 5)}); do [ -e {shlex.quote(str(until))} ] && exit 0;"
            " sleep 0.2; done")
        job = self.stack.cluster.submit(["-J", name, *pinned, *args], wrap=wrap)
        self.result.job_ids.append(job)
        self.say(f"  sbatch {' '.join([*pinned, *args])}  -> job {job}")
        return job

    def running(self, job: str, load: float) -> list[int]:
        """Wait for the job to run and be capped; start its simulated workload."""
        state = self.stack.cluster.wait_job(job, ("RUNNING",), timeout=60)
        if state != "RUNNING":
            raise SparkError(f"job {job} is {state}, not RUNNING")
        gpus = self.context.get(job).gpus_on(self.stack.cluster.node)
        if not self.stack.find_records("cap", job, timeout=30):
            raise SparkError(f"job {job}: no cap PER after 30 s")
        self.stack.set_load(load, gpus)
        self.say(f"  job {job} running on GPUs {gpus}, workload at {load:.0%}")
        return gpus

    def finish(self, job: str, gpus: list[int]) -> None:
        state = self.stack.cluster.wait_job(job, timeout=90)
        self.stack.set_load(0.0, gpus)
        self.check("job completed", state == "COMPLETED", f"job {job} ended {state}")
        restore = self.stack.find_records("restore", job, timeout=30)
        self.check("epilog restore recorded", bool(restore),
                   f"restore PER seq {restore[0].seq}" if restore else "no restore PER")

    def facility_of(self, rec: Record, timeout: float = 20) -> Record | None:
        """The facility follow-up PER of an action (its `ref` names the action)."""
        found = self.stack.find_records("facility", None, timeout=timeout,
                                        match={"ref": {"seq": rec.seq, "hash": rec.hash}})
        return found[0] if found else None

    def one(self, kind: str, job: str | None, timeout: float, **match: Any) -> Record | None:
        found = self.stack.find_records(kind, job, timeout=timeout, match=match)
        return found[0] if found else None


def _paths_ok(body: dict[str, Any]) -> bool:
    p = body.get("paths") or {}
    return (p.get("telemetry") == "ok" and p.get("policy") in ("allow", "clamp")
            and p.get("ledger") == "committed" and p.get("facility") == "pending")


# --------------------------------------------------------------------- thermal
def thermal(sc: Scenario) -> None:
    """Training run, thermal spike mid-run: throttled with all paths, released with hysteresis."""
    st = sc.stack
    job = sc.submit("demo-thermal", ["--gres=gpu:2,gpupower:1400",
                                     "--comment=spark:class=training"], 26)
    gpus = sc.running(job, 1.0)
    hot = gpus[0]
    st.sparkctl("sim", "fault", str(st.sim_dir), "--gpu", str(hot), "thermal-spike",
                "--for", "12")
    sc.say(f"  sparkctl sim fault --gpu {hot} thermal-spike --for 12")
    throttle = sc.one("throttle", job, 30, gpu=hot)
    if not sc.check("thermal guard throttled the hot GPU", throttle is not None,
                    f"GPU {hot}" if throttle is None else f"seq {throttle.seq}"):
        return
    assert throttle is not None
    b = throttle.body
    sc.check("throttle at or above the threshold", b.get("temp_mc", 0) >= THRESHOLD_MC,
             f"{b.get('temp_mc', 0) / 1000:.1f} °C ≥ {THRESHOLD_MC // 1000} °C")
    sc.check("throttle lowered the cap", b.get("to_mw", 0) < b.get("from_mw", 0),
             f"{b.get('from_mw', 0) // 1000} W -> {b.get('to_mw', 0) // 1000} W, "
             f"read back {b.get('readback_mw', 0) // 1000} W")
    sc.check("throttle carries its validation paths", _paths_ok(b)
             and b.get("authority") == "automation:thermal", str(b.get("paths")))
    facility = sc.facility_of(throttle)
    sc.check("throttle's facility follow-up recorded", facility is not None,
             "none" if facility is None else str(facility.body.get("verdict")))
    release = sc.one("release", job, 40, gpu=hot)
    if sc.check("released once cool", release is not None,
                "" if release is None else f"seq {release.seq}"):
        assert release is not None
        r = release.body
        sc.check("release below the release threshold (hysteresis)",
                 r.get("temp_mc", 10**9) <= RELEASE_MC < THRESHOLD_MC,
                 f"{r.get('temp_mc', 0) / 1000:.1f} °C ≤ {RELEASE_MC // 1000} °C "
                 f"< {THRESHOLD_MC // 1000} °C")
        sc.check("release restores the job's cap and links the throttle",
                 r.get("to_mw") == b.get("from_mw")
                 and (r.get("ref") or {}).get("seq") == throttle.seq,
                 f"back to {r.get('to_mw', 0) // 1000} W, ref seq "
                 f"{(r.get('ref') or {}).get('seq')}")
    sc.finish(job, gpus)


# ------------------------------------------------------------------------ deny
def deny(sc: Scenario) -> None:
    """Inference job over the fleet policy: refused by sbatch, recorded, budget held."""
    st = sc.stack
    ok_job = sc.submit("demo-infer-ok", ["--gres=gpu:4,gpupower:1600",
                                         "--comment=spark:class=inference"], 8)
    gpus = sc.running(ok_job, 0.7)
    spooler = st.controller     # the slurmctld host's sparkd ingests job_submit.lua's spool
    before = {r.seq for r in spooler.records() if r.kind == "admission"}
    args = ["-J", "demo-infer-big", "--gres=gpu:4,gpupower:2400",
            "--comment=spark:class=inference"]
    res = st.cluster.sbatch(args, check=False)
    first = res.stderr.strip().splitlines()[0] if res.stderr.strip() else ""
    sc.say(f"  sbatch {' '.join(args[2:])}  -> {first}")
    sc.check("sbatch refused the job with a clear message",
             res.returncode != 0 and first.startswith("sbatch: error: spark:")
             and "inference" in first, first)
    sc.check("no job was created", res.stdout.strip() == "", res.stdout.strip() or "no job id")
    refused = time.monotonic()
    denials: list[Record] = []

    def recorded() -> bool:   # no `ingest` request: sparkd watches the spool itself
        denials[:] = [r for r in spooler.records() if r.kind == "admission"
                      and r.seq not in before and r.body.get("decision") == "deny"]
        return bool(denials)

    wait_for(recorded, 15, 0.2)
    rec = denials[-1] if denials else None
    if sc.check("denial recorded from the spool as an admission PER within seconds",
                rec is not None, "" if rec is None else
                f"seq {rec.seq} on {spooler.name}'s ledger, "
                f"{time.monotonic() - refused:.1f} s after the refusal"):
        assert rec is not None
        b = rec.body
        ctx, req = b.get("context") or {}, b.get("request") or {}
        sc.check("the PER names rule, reason and policy",
                 b.get("rule") == "class:inference" and bool(b.get("reason"))
                 and len(str(b.get("policy_sha256"))) == 64,
                 f"rule {b.get('rule')}: {b.get('reason')}")
        sc.check("the PER holds the full request context",
                 req.get("gpus") == 4 and req.get("watts") == 2400
                 and ctx.get("user") == "root" and ctx.get("job_name") == "demo-infer-big"
                 and "class=inference" in str(ctx.get("comment")) and b.get("source") == "spool",
                 f"request {req.get('gpus')} GPUs/{req.get('watts')} W, user {ctx.get('user')}, "
                 f"job name {ctx.get('job_name')}")
    if rec is not None:
        sc.say(f"  ledger: {summarize('admission', rec.body)}")
    # replay the node's governed state at every record of this scenario: the caps held
    # by jobs must never add up to more than the node's gpupower budget
    since = min((r.seq for r in st.records(ok_job)), default=0)
    instants = [r.time_ns for r in st.records() if r.seq >= since] + [time.time_ns()]
    peak = max(sum(g.limit_mw or 0 for g in replay(st.ledger, t).gpus if g.job_id)
               for t in instants)
    used = st.cluster.job_field(ok_job, "TresPerNode")
    budget_w = st.cluster.budget_w(st.cluster.node)
    sc.check("node GPU power budget never exceeded (ledger replay)",
             0 < peak <= budget_w * 1000,
             f"peak of governed caps {peak // 1000} W over {len(instants)} instants ≤ "
             f"{budget_w} W; Slurm allocated {used}")
    caps = [r for r in st.records() if r.kind == "cap"
            and r.body.get("context", {}).get("job_name") == "demo-infer-big"]
    sc.check("the refused request never reached a GPU", not caps, f"{len(caps)} cap PERs")
    sc.finish(ok_job, gpus)


# ---------------------------------------------------------------- driver crash
def driver_crash(sc: Scenario) -> None:
    """Multi-GPU job whose driver crashes: fault, ceiling proven held, recovery."""
    st = sc.stack
    job = sc.submit("demo-crash", ["--gres=gpu:4,gpupower:2000",
                                   "--comment=spark:class=training"], 14)
    gpus = sc.running(job, 1.0)
    bad = gpus[1]
    time.sleep(1.0)  # a few good readings before the crash: the baseline for the proof
    st.sparkctl("sim", "fault", str(st.sim_dir), "--gpu", str(bad), "driver-crash", "--for",
                "4")
    sc.say(f"  sparkctl sim fault --gpu {bad} driver-crash --for 4")
    fault = sc.one("fault", job, 15, gpu=bad)
    if not sc.check("driver fault recorded", fault is not None,
                    "" if fault is None else f"seq {fault.seq}: {fault.body.get('error')}"):
        return
    assert fault is not None
    sc.check("fault names the governed ceiling", fault.body.get("expected_mw") == 500_000,
             f"expected {fault.body.get('expected_mw', 0) // 1000} W")
    rec = sc.one("recovery", job, 20, gpu=bad)
    if sc.check("recovery recorded", rec is not None, "" if rec is None else f"seq {rec.seq}"):
        assert rec is not None
        b = rec.body
        sc.check("ceiling proven held through the crash",
                 b.get("held") is True and b.get("enforced_mw") == 500_000
                 and 0 < b.get("outage_avg_power_mw", 10**12) <= 500_000,
                 f"held={b.get('held')}, enforced {b.get('enforced_mw', 0) // 1000} W, outage "
                 f"average {b.get('outage_avg_power_mw', 0) / 1000:.0f} W over "
                 f"{b.get('outage_ns', 0) / 1e9:.1f} s")
        sc.check("recovery links the fault", (b.get("ref") or {}).get("seq") == fault.seq,
                 f"ref seq {(b.get('ref') or {}).get('seq')}")
    sc.finish(job, gpus)


# ----------------------------------------------------------------- out of band
def oob(sc: Scenario) -> None:
    """A cap changed around the daemon: detected, reconciled, pinpointed by audit and replay."""
    st = sc.stack
    job = sc.submit("demo-oob", ["--gres=gpu:2,gpupower:800"], 12)
    gpus = sc.running(job, 0.8)
    victim = gpus[-1]
    time.sleep(1.0)
    changed_ns = time.time_ns()
    st.sparkctl("sim", "smi", str(st.sim_dir), "-i", str(victim), "-pl", "250")
    sc.say(f"  sparkctl sim smi -i {victim} -pl 250   (out of band, like nvidia-smi)")
    drift = sc.one("drift", job, 15, gpu=victim)
    if not sc.check("out-of-band change detected as drift", drift is not None,
                    "" if drift is None else f"seq {drift.seq}"):
        return
    assert drift is not None
    b = drift.body
    sc.check("drift records what changed and that it was not governed",
             b.get("cause") == "out-of-band" and b.get("observed_mw") == 250_000
             and b.get("expected_mw") == 400_000
             and (b.get("requester") or {}).get("role") == "automation",
             f"expected {b.get('expected_mw', 0) // 1000} W, observed "
             f"{b.get('observed_mw', 0) // 1000} W, cause {b.get('cause')}")
    lag = (drift.time_ns - changed_ns) / 1e9
    sc.check("drift pinpoints when", 0 <= lag < 5, f"recorded {lag:.2f} s after the change")
    sc.check("drift reconciled to the governed cap",
             b.get("action") == "reconcile" and b.get("readback_mw") == 400_000
             and st.limits_w()[victim] == 400,
             f"read back {b.get('readback_mw', 0) // 1000} W, GPU now "
             f"{st.limits_w()[victim]} W")
    report = audit_job(st.ledger, job)
    kinds = [e.kind for e in report.timeline]
    governed_250 = [e for e in report.timeline if e.kind in ("cap", "throttle", "release")
                    and "->250 W" in e.summary]
    sc.check("audit shows the drift in the job's timeline, no governed 250 W action",
             "drift" in kinds and not governed_250, " ".join(kinds))
    for e in report.timeline:
        sc.say(f"  audit: seq {e.seq} {e.summary}" + (f" [{e.authority}]" if e.authority else ""))
    pre = {g.gpu: g for g in replay(st.ledger, drift.time_ns - 1).gpus}.get(victim)
    post = {g.gpu: g for g in replay(st.ledger, drift.time_ns).gpus}.get(victim)
    for label, g in (("just before the drift", pre), ("at the drift", post)):
        if g is not None:
            sc.say(f"  replay {label}: gpu{g.gpu} {(g.limit_mw or 0) // 1000} W, job "
                   f"{g.job_id}, set by seq {g.seq} ({g.kind})")
    sc.check("replay: governed 400 W before the drift, reconciled by the drift PER",
             pre is not None and pre.limit_mw == 400_000 and pre.kind == "cap"
             and post is not None and post.kind == "drift" and post.limit_mw == 400_000,
             f"before: {pre.limit_mw if pre else None} mW by {pre.kind if pre else None}; "
             f"at drift: {post.limit_mw if post else None} mW by {post.kind if post else None}")
    sc.finish(job, gpus)


# ------------------------------------------------------------------ multi-node
def multi_node(sc: Scenario) -> None:
    """One job across three real slurmd; per-node budgets; the head node's collection."""
    from spark_slurm.demo.multinode import run_multi_node  # noqa: PLC0415 (its own module)

    run_multi_node(sc)


SCENARIOS: dict[str, tuple[str, Callable[[Scenario], None]]] = {
    "thermal": ("training run with a thermal spike mid-run", thermal),
    "deny": ("inference job over the fleet policy", deny),
    "driver-crash": ("multi-GPU job whose driver crashes mid-run", driver_crash),
    "oob": ("post-incident investigation of an out-of-band cap change", oob),
    "incident": ("post-incident replay: a GPU that ignored a demand-response cap, "
                 "pinpointed by sparkctl replay --at and audit", incident.post_incident),
    "no-cap": ("Karman reference: no power cap, the rack at the uncapped load",
               karman_stories.no_cap),
    "static-300": ("Karman reference: static 300 W per GPU, the rack held at the cap",
                   karman_stories.static_300),
    "dynamic": ("dynamic capping 900/600/300 W with facility correlation",
                karman_stories.dynamic),
    "partial-dynamic": ("Karman reference: uncapped, two 900/600/300 W cycles mid-run",
                        karman_stories.partial_dynamic),
    "multi-node": ("one job on three nodes: per-node budgets, collection, merge, audit",
                   multi_node),
}
# Scenarios that need a cluster of at least this many nodes (`sparkctl demo --nodes N`).
MIN_NODES: dict[str, int] = {"multi-node": 3}


def run_scenario(name: str, stack: ClusterStack, say: Say) -> ScenarioResult:
    """Run one scenario; any error that stops it is recorded as a failed check."""
    title, fn = SCENARIOS[name]
    result = ScenarioResult(name, title, started_ns=time.time_ns())
    sc = Scenario(stack, result, say)
    try:
        fn(sc)
    except SparkError as exc:
        sc.check("scenario ran to the end", False, exc.message)
        for job in result.job_ids:  # leave the GPUs free for the next scenario
            stack.cluster.run(["scancel", job], check=False)
        stack.set_load(0.0)
    result.ended_ns = time.time_ns()
    return result
