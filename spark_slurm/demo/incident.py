"""Post-incident replay: a GPU that silently ignored a demand-response cap, found afterwards.

The run: a 4-GPU training job at 600 W per GPU. One GPU's firmware starts to
ignore limit changes (`sparkctl sim fault silent-mismatch`: it keeps enforcing
600 W while reporting the new request). The facility asks the node to shed
power and an admin caps the job to 300 W per GPU; three GPUs follow, one does
not, and the rack sheds three GPUs' worth instead of four. The firmware
recovers a few seconds later and the job ends normally.

The investigation, after the job has ended, uses only what a person on call
has: the job id, the instant the facility saw the rack too high, and the
ledger. `sparkctl replay --at INSTANT --json` names the GPU still at 600 W and
the exact record that left it there (seq, kind, job); `sparkctl audit JOB
--json` exits 1 with that record as its one problem (read-back mismatch) and
a `fault` record saying the cause (intended 300 W, enforced 600 W), every
record verified (chain, proof, MAC). The scenario asserts that the record
replay and audit name is the one the anomaly produced (the cap's own seq,
from `sparkctl cap --json`) and that the cause is right. The end-of-run audit
of this job then expects exactly that problem (`expected_problems`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

from spark_slurm.demo.rackpower import SETTLE_S, GpuSpec, rack_w
from spark_slurm.errors import SparkError

if TYPE_CHECKING:
    from spark_slurm.demo.scenarios import Scenario

JOB_GPUS, JOB_W, SHED_W = 4, 600, 300     # per GPU: the job's cap, the demand-response cap
FAULT_S = 6.0                             # how long the firmware ignores limit changes
ALERT_AFTER_S = 2.0                       # when the facility saw the rack too high


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def _json(sc: Scenario, *args: str) -> tuple[int, dict[str, Any]]:
    res = sc.stack.sparkctl(*args, check=False)
    try:
        return res.returncode, dict(json.loads(res.stdout))
    except ValueError:
        raise SparkError(f"sparkctl {args[0]} printed no JSON (exit {res.returncode}): "
                         f"{res.stderr.strip()[-500:]}") from None


def _gpu(report: dict[str, Any], node: str, gpu: int) -> dict[str, Any]:
    return next((g for g in report.get("gpus", []) if g["node"] == node and g["gpu"] == gpu),
                {})


def post_incident(sc: Scenario) -> None:
    st = sc.stack
    node = st.nodes[0].name
    done = st.root / "incident.done"
    done.unlink(missing_ok=True)
    job = sc.submit("demo-incident", [f"--gres=gpu:{JOB_GPUS},gpupower:{JOB_GPUS * JOB_W}",
                                      "--comment=spark:class=training"], 60, until=done)
    gpus = sc.running(job, 1.0)
    prolog = sc.one("cap", job, 5)
    victim = gpus[-1]
    # the cap's facility before-window must see the job's settled 600 W, not its start
    time.sleep(st.facility_before_s + SETTLE_S + 0.1)
    faulted = time.monotonic()
    st.sparkctl("sim", "fault", str(st.sim_dir), "--gpu", str(victim), "silent-mismatch",
                "--for", f"{FAULT_S:g}")
    sc.say(f"  sparkctl sim fault --gpu {victim} silent-mismatch --for {FAULT_S:g}   "
           "(its firmware now ignores limit changes)")
    time.sleep(0.3)
    before_ns = time.time_ns()
    code, reply = _json(sc, "cap", "--job", job, "--watts", str(SHED_W), "--socket",
                        str(st.socket), "--reason", "demand response: shed load", "--json")
    seq = reply.get("seq")
    sc.say(f"  sparkctl cap --job {job} --watts {SHED_W}   (demand response) -> exit {code}, "
           f"PER seq {seq}")
    alert_ns = time.time_ns() + int(ALERT_AFTER_S * 1e9)
    entries = {g.get("index"): g for g in reply.get("gpus", [])}
    bad = entries.get(victim, {})
    rest = sorted({entries.get(g, {}).get("readback_mw", 0) // 1000 for g in gpus if g != victim})
    sc.check("the demand-response cap recorded the GPU that did not follow",
             code == 0 and isinstance(seq, int) and bad.get("ok") is False
             and bad.get("readback_mw") == JOB_W * 1000
             and all(entries.get(g, {}).get("readback_mw") == SHED_W * 1000
                     for g in gpus if g != victim),
             f"PER seq {seq}: gpu{victim} read back {bad.get('readback_mw', 0) // 1000} W, "
             f"intended {bad.get('intended_mw', 0) // 1000} W; the others {rest} W")
    time.sleep(max(0.0, FAULT_S + 0.5 - (time.monotonic() - faulted)))  # firmware recovers
    done.touch()
    sc.finish(job, gpus)
    st.settle()   # the restore's facility follow-up too: the investigation sees all of it
    if not isinstance(seq, int):
        raise SparkError(f"job {job}: the demand-response cap returned no PER seq")
    cap = next((r for r in st.records(job) if r.seq == seq), None)
    facility = sc.facility_of(cap) if cap is not None else None

    sc.say(f"  -- after the job: the facility saw the rack too high at {_iso(alert_ns)}")
    _, during = _json(sc, "replay", "--db", str(st.ledger), "--node", node, "--at",
                      _iso(alert_ns), "--json")
    _, prior = _json(sc, "replay", "--db", str(st.ledger), "--node", node, "--at",
                     _iso(before_ns), "--json")
    held, was = _gpu(during, node, victim), _gpu(prior, node, victim)
    for label, g in (("just before the cap", was), ("at the alert", held)):
        per = g.get("per") or {}
        sc.say(f"  sparkctl replay --at ({label}): gpu{victim} "
               f"{(g.get('limit_mw') or 0) // 1000} W, job {g.get('job_id')}, "
               f"seq {per.get('seq')} ({per.get('kind')})")
    others = [_gpu(during, node, g) for g in gpus if g != victim]
    sc.check("replay --at the alert names the GPU held at 600 W and the record behind it",
             held.get("limit_mw") == JOB_W * 1000 and held.get("job_id") == job
             and (held.get("per") or {}).get("seq") == seq
             and (held.get("per") or {}).get("kind") == "cap"
             and all(o.get("limit_mw") == SHED_W * 1000 and (o.get("per") or {}).get("seq")
                     == seq for o in others),
             f"gpu{victim} {(held.get('limit_mw') or 0) // 1000} W by seq "
             f"{(held.get('per') or {}).get('seq')}, the others "
             f"{sorted({(o.get('limit_mw') or 0) // 1000 for o in others})} W by the same "
             f"record (the cap's seq is {seq})")
    sc.check("replay just before the cap: the job's own 600 W, from its prolog",
             was.get("limit_mw") == JOB_W * 1000 and prolog is not None
             and (was.get("per") or {}).get("seq") == prolog.seq,
             f"gpu{victim} {(was.get('limit_mw') or 0) // 1000} W by seq "
             f"{(was.get('per') or {}).get('seq')} (prolog cap seq "
             f"{prolog.seq if prolog else '-'})")
    _audit(sc, job, node, victim, seq)
    spec = GpuSpec.of(st.spec.gpu_model)
    idle = [spec.idle_w] * (st.spec.gpus - JOB_GPUS)
    full, all_shed = [spec.draw_w(JOB_W, True)] * JOB_GPUS, [spec.draw_w(SHED_W, True)] * JOB_GPUS
    drop_all = rack_w(full + idle) - rack_w(all_shed + idle)
    drop_held = rack_w(full + idle) - rack_w(all_shed[1:] + full[:1] + idle)
    delta = -(facility.body.get("delta_mw", 0) / 1000) if facility is not None else 0.0
    sc.check("the rack shed three GPUs' worth, not four (facility follow-up)",
             facility is not None and abs(delta - drop_held) < abs(delta - drop_all),
             f"rack fell {delta:.0f} W; {drop_held:.0f} W if one GPU held, {drop_all:.0f} W "
             f"if all four followed (verdict {facility.body.get('verdict') if facility else '-'})")
    sc.result.expected_problems[job] = [f"{node} seq {seq} (cap) not validated: "
                                        "readback=mismatch"]


def _audit(sc: Scenario, job: str, node: str, victim: int, seq: int) -> None:
    st = sc.stack
    code, report = _json(sc, "audit", job, "--db", str(st.ledger), "--keys",
                         str(st.trust_dir), "--json")
    problems = (report.get("verdict") or {}).get("problems", [])
    for p in problems:
        sc.say(f"  sparkctl audit {job}: problem: {p}")
    expected = f"{node} seq {seq} (cap) not validated: readback=mismatch"
    sc.check("audit exits 1 naming that record, and only it", code == 1
             and problems == [expected], f"exit {code}; problems {problems}")
    timeline = report.get("timeline", [])
    cause = f"intended {SHED_W * 1000} mW, enforced {JOB_W * 1000} mW"
    faults = [e for e in timeline if e["kind"] == "fault" and e["gpus"] == [victim]]
    for e in faults:
        sc.say(f"  sparkctl audit {job}: seq {e['seq']} {e['summary']}")
    sc.check("audit gives the cause: the firmware kept 600 W (fault record)",
             len(faults) == 1 and cause in faults[0]["summary"],
             "; ".join(f"seq {e['seq']}: {e['summary']}" for e in faults) or "no fault record")
    sc.check("the evidence is intact: every record verified (chain, proof, MAC)",
             bool(timeline) and all(e["verified"] and e["mac"] == "ok" for e in timeline),
             f"{len(timeline)} records, "
             f"{sum(1 for e in timeline if e['proof'] == 'ok')} with an inclusion proof")
