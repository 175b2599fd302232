"""job_submit.lua at each limit's edge: exactly the maximum is admitted as asked, one watt
over is clamped or denied, and the same for minimums (etc/policy.yaml, per node watts)."""

from __future__ import annotations

import pytest

from tests.unit.lua.conftest import LuaPlugin

# (account, GPUs, node watts asked) -> (rc, granted node watts or None, rule)
EDGES = [
    (None, 2, 1400, 0, 1400, "gpu-limits"),  # 700 W/GPU: the site maximum exactly
    (None, 2, 1401, -1, None, "gpu-limits"),  # 1 W over, on_exceed: deny
    ("physics", 2, 1200, 0, 1200, "tenant:physics"),  # 600 W/GPU, the tenant's clamp max
    ("physics", 2, 1201, 0, 1200, "tenant:physics"),  # 1 W over: clamped to the maximum
    ("students", 2, 700, 0, 700, "tenant:students"),  # 350 W/GPU exactly
    ("students", 2, 701, -1, None, "tenant:students"),  # 1 W over a deny maximum
    (None, 2, 400, 0, 400, "gpu-limits"),  # 200 W/GPU: the minimum exactly
    (None, 2, 399, 0, 400, "gpu-limits"),  # 1 W under: raised to the minimum
]


@pytest.mark.parametrize(("account", "gpus", "watts", "rc", "granted", "rule"), EDGES)
def test_a_limit_admits_its_own_value_and_not_one_watt_more(
        plugin: LuaPlugin, account: str | None, gpus: int, watts: int, rc: int,
        granted: int | None, rule: str) -> None:
    out = plugin.submit(account=account, tres_per_node=f"gres:gpu:{gpus},gres:gpupower:{watts}")
    assert out.rc == rc, (out.user, out.error)
    if rc == 0:
        assert (int(out.token["watts"]), out.token["rule"]) == (granted, rule)
    else:
        (denial,) = plugin.spool_lines()
        assert denial["rule"] == rule
        assert f"gpupower:{watts}" in " ".join(out.user)
