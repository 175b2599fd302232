"""job_submit.lua and Policy.evaluate decide every admission request the same way."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from spark_slurm.daemon.ingest import admission_body
from spark_slurm.head.replay import replay
from spark_slurm.ledger import Ledger
from spark_slurm.policy import Policy, PowerRequest
from tests.unit.lua.conftest import LuaPlugin

LAYERED = Path(__file__).resolve().parents[2] / "data" / "policy" / "layered.yaml"


def _cases() -> list[dict[str, Any]]:
    cases = []
    grid = itertools.product(
        [None, "physics", "bio", "chem", "other"], [None, "gpu", "debug", "gpu,debug"],
        [None, "low", "night"], [None, "training", "inference"], [1, 3, 4],
        [None, 1, 300, 700, 1000, 1799, 2000, 2001, 99999])
    # Every combination: a third of the grid (every value still appearing) let a shim
    # that admitted 1 W over a maximum pass, because that case fell between the thirds.
    for account, partition, qos, cls, gpus, watts in grid:
        tres = f"gres:gpu:{gpus}" + (f",gres:gpupower:{watts}" if watts else "")
        cases.append({"account": account, "partition": partition, "qos": qos,
                      "comment": f"spark:class={cls}" if cls else None,
                      "tres_per_node": tres, "_gpus": gpus, "_watts": watts, "_class": cls})
    return cases


def test_lua_and_python_name_the_same_rule_and_grant(plugin: LuaPlugin) -> None:
    text = LAYERED.read_text()
    plugin.install(text)
    policy = Policy.from_text(text)
    cases = _cases()
    outcomes = plugin.run([{"job_desc": {k: v for k, v in c.items() if not k.startswith("_")}}
                           for c in cases])
    denials = iter(plugin.spool_lines())
    mismatches = []
    for case, out in zip(cases, outcomes, strict=True):
        g, w = case["_gpus"], case["_watts"]
        want = policy.evaluate(PowerRequest(
            op="admission", gpus=g, requested_mw_per_gpu=None if w is None else w * 1000 // g,
            account=case["account"], partition=case["partition"], qos=case["qos"],
            workload_class=case["_class"]))
        if out.rc == -1:
            got = ("deny", next(denials)["rule"], None)
        else:
            tok = out.token
            action = "allow" if tok["watts"] == str(w or tok["watts"]) else "clamp"
            got = (action, tok["rule"], int(tok["watts"]) * 1000 // g)
        expected = (want.action, want.rule, want.granted_mw)
        if w is None and expected[0] == "clamp":
            expected = ("allow", *expected[1:])  # an injected default is never "asked"
        if got != expected:
            mismatches.append((case, got, expected))
    assert mismatches == []
    assert len(cases) == 5 * 4 * 3 * 3 * 3 * 9


def test_replay_recheck_reproduces_every_denial_the_shim_spooled(plugin: LuaPlugin,
                                                                 tmp_path: Path) -> None:
    """Denials from the real job_submit.lua, recorded as sparkd records them, decide the
    same way again under `replay --recheck`; a doctored one is reported."""
    text = LAYERED.read_text()
    plugin.install(text)
    policy = Policy.from_text(text)
    cases = _cases()
    plugin.run([{"job_desc": {k: v for k, v in c.items() if not k.startswith("_")}}
                for c in cases])
    lines = plugin.spool_lines()
    assert len(lines) > 20 and {line["rule"] for line in lines} >= {
        "gpu-limits", "bio-no-training", "low-debug"}
    doctored = dict(lines[0], rule="floor-for-training")
    path = tmp_path / "n1.db"
    with Ledger.open(path, node="n1") as led:
        led.append("policy", dict(policy.snapshot_body(), node="n1"))
        for line in [*lines, doctored]:
            led.append("admission", admission_body(line, "n1"))
    report = replay(path, 2**62, with_recheck=True)
    assert len(report.rechecks) == len(lines) + 1
    bad = [r for r in report.rechecks if not r.ok]
    assert [(b.recorded["rule"], b.replayed and b.replayed["rule"]) for b in bad] == [
        ("floor-for-training", lines[0]["rule"])]
