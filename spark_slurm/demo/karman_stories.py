"""The Karman reference stories, each asserted against the rack's facility stream.

The reference lab recorded an 8 × B200 node at its PDU inlet four times: no
power cap, a static 300 W cap, 900/600/300 W steps the whole run, and uncapped
with two 900/600/300 W cycles in the middle (datasets/README.md). Each story
here runs an 8-GPU job on the first node following that run's cap pattern,
records every AC cycle of the node's rack stream with `sparkctl karman record`
(three-phase power = Σ phase_a over karman1..3, as the reference's), and asserts:

- each part of the run (idle; each cap step, its first SETTLE_S left out) holds
  the rack at what the GPUs' caps predict, within −4 %/+1.5 %, and no cycle goes
  above the caps' ceiling (rackpower.py says why those bounds);
- every admin step is facility-correlated by sparkd (the facility PER);
- its shape against the matching reference recording (reference.py): a cap takes
  at least as large a share of the uncapped rack power here as in the lab, within
  5 points, and the partial-dynamic rack returns to its uncapped level after the
  cycles as the lab's did.

"Uncapped" is the B200's default limit, its 1,000 W TDP (the reference's no-cap
run): an admin sets it with `sparkctl cap --watts 1000`. The steps are STEP_S
long (the lab's were ~10 s), so each story takes well under a minute.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from spark_slurm.demo import rackpower
from spark_slurm.demo.node import tool
from spark_slurm.demo.rackpower import GpuSpec, Level, Segment
from spark_slurm.demo.reference import SHAPE_MARGIN, reference_levels
from spark_slurm.errors import SparkError
from spark_slurm.ledger.records import Record

if TYPE_CHECKING:
    from spark_slurm.demo.scenarios import Scenario

DYNAMIC_STEPS_W = (900, 600, 300)           # the Karman dataset's dynamic scenario
STEP_S = 5.0
UNCAPPED_W = 1000                           # the B200's default limit (TDP): no power cap
HOLD_S = 4.5                                # a settled level: SETTLE_S + 3 s of cycles


class RackStream:
    """`sparkctl karman record` on the first node for one story: every cycle of the rack
    stream sparkd follows, into a SQLite file, read back as (time_ns, three-phase W)."""

    def __init__(self, sc: Scenario, story: str) -> None:
        self.stack = sc.stack
        self.db = sc.stack.root / "karman" / f"{story}.db"
        self.service = f"karman-record-{story}"

    def __enter__(self) -> RackStream:
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.db.unlink(missing_ok=True)
        node = self.stack.nodes[0]
        self.stack.services.start(self.service, node.in_ns([
            *tool("sparkctl"), "karman", "record", "--endpoint", node.karman_endpoint,
            "--to", str(self.db)]), ready=lambda: bool(self.series()), timeout_s=30)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stack.services.stop(self.service)  # SIGTERM: the recorder flushes, then exits

    def series(self) -> list[tuple[int, float]]:
        """Each whole cycle (all three phases recorded) with the rack's real power."""
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT time_ns, SUM(real_power_w) FROM karman_readings "
                                  "GROUP BY time_ns HAVING COUNT(*) = 3 ORDER BY time_ns")
                return [(int(t), float(w)) for t, w in rows]
        except sqlite3.Error:
            return []    # not created yet


def _cap(sc: Scenario, job: str, watts: int, reason: str) -> tuple[bool, int]:
    """`sparkctl cap` as the admin; whether it was applied to the job's GPUs, and when
    the call returned (the limits are set by then)."""
    st = sc.stack
    res = st.sparkctl("cap", "--job", job, "--watts", str(watts), "--socket", str(st.socket),
                      "--reason", reason, check=False)
    done = time.time_ns()
    sc.say(f"  sparkctl cap --job {job} --watts {watts}  -> "
           f"{(res.stdout or res.stderr).strip()}")
    return res.returncode == 0, done


def _predict(sc: Scenario, gpus: list[int], seg: Segment) -> float:
    spec = GpuSpec.of(sc.stack.spec.gpu_model)
    return rackpower.predicted_rack_w(spec, sc.stack.spec.gpus, gpus if seg.loaded else [],
                                      seg.cap_w)


def _judge(sc: Scenario, gpus: list[int], measured: list[Level], name: str) -> dict[str, float]:
    """One check per part of the run; returns the measured means by label."""
    for level in measured:
        seg = level.segment
        verdict = rackpower.judge_level(level, _predict(sc, gpus, seg))
        sc.check(f"{name}: {seg.label} rack power as the caps predict", verdict.ok,
                 verdict.detail)
    return {lv.segment.label: lv.mean_w for lv in measured}


def _reference(sc: Scenario) -> Path:
    return sc.stack.repo / "datasets"


def _correlated(sc: Scenario, caps: list[tuple[int, Record | None]], what: str) -> None:
    verdicts = []
    for watts, cap in caps:
        facility = sc.facility_of(cap, 20) if cap is not None else None
        b = facility.body if facility is not None else {}
        verdicts.append((watts, b.get("verdict"), b.get("delta_mw", 0),
                         b.get("expected_delta_mw", 0)))
    sc.check(f"{what} facility-correlated by sparkd",
             all(v == "correlated" for _, v, _, _ in verdicts),
             "; ".join(f"{w} W {v} (rack Δ {d / 1000:.0f} W vs GPU Δ {e / 1000:.0f} W)"
                       for w, v, d, e in verdicts))


def _cap_record(sc: Scenario, job: str, watts: int) -> Record | None:
    found = [r for r in sc.stack.records(job) if r.kind == "cap"
             and (r.body.get("decision") or {}).get("granted_mw") == watts * 1000]
    return found[-1] if found else None


def _finish(sc: Scenario, job: str, gpus: list[int], done: Path) -> None:
    done.touch()
    sc.finish(job, gpus)


# -------------------------------------------------------------------------- no cap
def no_cap(sc: Scenario) -> None:
    """8 GPUs flat out at their default 1,000 W limit: the rack at the uncapped load."""
    st = sc.stack
    done = st.root / "karman" / "no-cap.done"
    with RackStream(sc, "no-cap") as stream:
        job = sc.submit("demo-no-cap", ["--gres=gpu:8,gpupower:5600",
                                        "--comment=spark:class=training"], 60, until=done)
        gpus = sc.running(job, 0.0)
        t_idle = time.time_ns()
        time.sleep(HOLD_S)
        ok, _ = _cap(sc, job, UNCAPPED_W, "no power cap: the GPUs' default limit (TDP)")
        limits = st.limits_w()
        sc.check("cap lifted to the GPUs' 1,000 W default on all 8",
                 ok and all(limits[g] == UNCAPPED_W for g in gpus),
                 f"limits {sorted({limits[g] for g in gpus})} W")
        st.set_load(1.0, gpus)
        t_load = time.time_ns()
        sc.say(f"  workload at 100 % on GPUs {gpus}")
        time.sleep(max(HOLD_S, st.facility_after_s + 0.5))
        t_end = time.time_ns()
        _finish(sc, job, gpus, done)
    segments = [Segment("idle", None, False, t_idle, t_load - int(0.1e9)),
                Segment("uncapped", None, True, t_load, t_end)]
    got = _judge(sc, gpus, rackpower.levels(stream.series(), segments), "no-cap")
    _correlated(sc, [(UNCAPPED_W, _cap_record(sc, job, UNCAPPED_W))], "the lift")
    ref = reference_levels("no-cap", _reference(sc))
    ours, theirs = rackpower.cut(got["idle"], got["uncapped"]), rackpower.cut(ref["idle"],
                                                                             ref["loaded"])
    _against_reference(sc, "no-cap run: the load is as large a share of the rack", ours, theirs,
                       f"load = {ours:.0%} of the uncapped rack here ({got['idle'] / 1000:.2f}"
                       f" -> {got['uncapped'] / 1000:.2f} kW), {theirs:.0%} in the reference "
                       f"({ref['idle'] / 1000:.2f} -> {ref['loaded'] / 1000:.2f} kW)")


def _against_reference(sc: Scenario, what: str, ours: float, theirs: float, detail: str) -> None:
    """One-sided shape check: ours takes at least the reference's share, within the margin."""
    sc.check(f"against the reference {what}", ours >= theirs - SHAPE_MARGIN,
             f"{detail}; allowed {SHAPE_MARGIN * 100:.0f} points less")


# --------------------------------------------------------------------- static 300 W
def static_300(sc: Scenario) -> None:
    """An inference job capped at 300 W per GPU from its start: the rack held at the cap."""
    st = sc.stack
    done = st.root / "karman" / "static-300.done"
    with RackStream(sc, "static-300") as stream:
        job = sc.submit("demo-static-300", ["--gres=gpu:8,gpupower:2400",
                                            "--comment=spark:class=inference"], 60, until=done)
        gpus = sc.running(job, 0.0)
        t_idle = time.time_ns()
        cap = sc.one("cap", job, 5)
        granted = ((cap.body.get("decision") or {}).get("granted_mw") if cap else None)
        limits = st.limits_w()
        sc.check("300 W per GPU set by the prolog before the workload starts",
                 granted == 300_000 and len(gpus) == 8
                 and all(limits[g] == 300 for g in gpus),
                 f"cap PER seq {cap.seq if cap else '-'} granted "
                 f"{(granted or 0) // 1000} W/GPU; limits {sorted({limits[g] for g in gpus})} W")
        time.sleep(HOLD_S)
        st.set_load(1.0, gpus)
        t_load = time.time_ns()
        sc.say(f"  workload at 100 % on GPUs {gpus}")
        time.sleep(HOLD_S + 1.5)
        t_end = time.time_ns()
        _finish(sc, job, gpus, done)
    segments = [Segment("idle", 300, False, t_idle, t_load - int(0.1e9)),
                Segment("300 W", 300, True, t_load, t_end)]
    got = _judge(sc, gpus, rackpower.levels(stream.series(), segments), "static-300")
    _correlated(sc, [(300, cap)], "the prolog's cap")
    uncapped = _predict(sc, gpus, Segment("uncapped", None, True, 0, 0))
    ref = reference_levels("static-300", _reference(sc))
    ref_uncapped = reference_levels("no-cap", _reference(sc))["loaded"]
    ours, theirs = rackpower.cut(got["300 W"], uncapped), rackpower.cut(ref["loaded"],
                                                                       ref_uncapped)
    _against_reference(sc, "static-300 run: the cap takes as large a share", ours, theirs,
                       f"300 W takes {ours:.0%} of the uncapped rack here "
                       f"({got['300 W'] / 1000:.2f} of {uncapped / 1000:.2f} kW), {theirs:.0%} "
                       f"in the reference ({ref['loaded'] / 1000:.2f} of "
                       f"{ref_uncapped / 1000:.2f} kW, the no-cap run)")


# ------------------------------------------------------------------------- dynamic
def dynamic(sc: Scenario) -> None:
    """An admin steps an 8-GPU job's caps 900/600/300 W; every step facility-correlated."""
    st = sc.stack
    run_s = st.facility_before_s + len(DYNAMIC_STEPS_W) * STEP_S + st.facility_after_s + 4
    job = sc.submit("demo-dynamic", ["--gres=gpu:8,gpupower:5600",
                                     "--comment=spark:class=training"], run_s)
    gpus = sc.running(job, 1.0)
    time.sleep(st.facility_before_s + 0.5)  # a full before-window at the job's own cap
    caps: list[tuple[int, Record | None]] = []
    for watts in DYNAMIC_STEPS_W:
        started = time.monotonic()
        ok, _ = _cap(sc, job, watts, "dynamic capping step")
        limits = st.limits_w()
        sc.check(f"{watts} W step applied to all 8 GPUs",
                 ok and all(limits[g] == watts for g in gpus),
                 f"limits {sorted(set(limits[g] for g in gpus))} W")
        caps.append((watts, _cap_record(sc, job, watts)))
        time.sleep(max(0.0, STEP_S - (time.monotonic() - started)))
    for watts, cap in caps:
        facility = sc.facility_of(cap, 20) if cap is not None else None
        b = facility.body if facility is not None else {}
        sc.check(f"{watts} W step correlated with rack power",
                 b.get("verdict") == "correlated"
                 and (cap is not None and (cap.body.get("requester") or {}).get("role")
                      == "admin"),
                 f"verdict {b.get('verdict')}: rack Δ {b.get('delta_mw', 0) / 1000:.0f} W vs "
                 f"GPU Δ {b.get('expected_delta_mw', 0) / 1000:.0f} W")
    sc.finish(job, gpus)


# ---------------------------------------------------------------- partial dynamic
def partial_dynamic(sc: Scenario) -> None:
    """Uncapped, two 900/600/300 W cycles mid-run, uncapped again: each step at the rack."""
    st = sc.stack
    done = st.root / "karman" / "partial-dynamic.done"
    plan = [(f"{w} W #{k // 3 + 1}", w) for k, w in enumerate(DYNAMIC_STEPS_W * 2)]
    plan.append(("uncapped after", UNCAPPED_W))
    with RackStream(sc, "partial-dynamic") as stream:
        job = sc.submit("demo-partial-dynamic", ["--gres=gpu:8,gpupower:5600",
                                                 "--comment=spark:class=training"], 120,
                        until=done)
        gpus = sc.running(job, 1.0)
        ok, t_prev = _cap(sc, job, UNCAPPED_W, "partial dynamic: uncapped")
        if not ok:
            raise SparkError(f"job {job}: could not lift the cap to {UNCAPPED_W} W")
        # the first step's facility before-window must see the settled uncapped rack
        time.sleep(max(HOLD_S, rackpower.SETTLE_S + st.facility_before_s + 0.4))
        segments: list[Segment] = []
        caps: list[tuple[int, Record | None]] = []
        label, cap_w = "uncapped", UNCAPPED_W
        applied = []
        for next_label, watts in plan:
            started, t_call = time.monotonic(), time.time_ns()
            segments.append(Segment(label, cap_w, True, t_prev, t_call))
            ok, t_prev = _cap(sc, job, watts, f"partial dynamic: {next_label}")
            limits = st.limits_w()
            applied.append((watts, ok and all(limits[g] == watts for g in gpus)))
            caps.append((watts, _cap_record(sc, job, watts)))
            label, cap_w = next_label, watts
            hold = STEP_S if next_label != "uncapped after" else max(
                HOLD_S, st.facility_after_s + 0.5)
            time.sleep(max(0.0, hold - (time.monotonic() - started)))
        segments.append(Segment(label, cap_w, True, t_prev, time.time_ns()))
        _finish(sc, job, gpus, done)
    sc.check("every step applied to all 8 GPUs", all(a for _, a in applied),
             " ".join(f"{w} W {'ok' if a else 'NOT APPLIED'}" for w, a in applied))
    got = _judge(sc, gpus, rackpower.levels(stream.series(), segments), "partial-dynamic")
    _correlated(sc, caps, "every step")
    ref = reference_levels("dynamic-mid", _reference(sc))
    _shape(sc, got, ref)


def _shape(sc: Scenario, got: dict[str, float], ref: dict[str, float]) -> None:
    """Partial dynamic against the reference: the same ordering of steps, each cap taking
    at least the reference's share (within SHAPE_MARGIN), and back to uncapped after."""
    rows, ok = [], True
    for cycle in (1, 2):
        labels = [f"{w} W #{cycle}" for w in DYNAMIC_STEPS_W]
        for run in (got, ref):
            ok &= run[labels[0]] > run[labels[1]] > run[labels[2]]
        for label in labels:
            ours = rackpower.cut(got[label], got["uncapped"])
            theirs = rackpower.cut(ref[label], ref["uncapped"])
            ok &= ours >= theirs - SHAPE_MARGIN
            rows.append(f"{label} takes {ours:.0%} (reference {theirs:.0%})")
    back = [run["uncapped after"] / run["uncapped"] - 1 for run in (got, ref)]
    ok &= all(abs(b) <= SHAPE_MARGIN for b in back)
    sc.check("against the reference partial-dynamic run: same shape", ok,
             "; ".join(rows) + f"; after the cycles {back[0]:+.1%} vs before "
             f"(reference {back[1]:+.1%}), allowed ±{SHAPE_MARGIN:.0%}")
