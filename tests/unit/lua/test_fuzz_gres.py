"""Random GRES strings never make the plugin fail internally: every job is decided."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.lua.conftest import LuaPlugin

PIECES = ["gres:", "gres/", "", "gpu", "gpupower", "gpuX", "nvme", "h100", ":", "=", ",",
          "0", "1", "2", "800", "99999999", "1234567890123", "abc", "-", " ", "%", "%s", "\n",
          "\u00e9", "(S:0)"]
TRES = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


# The installed plugin is read-only state; the spool is emptied for each example.
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(TRES, st.one_of(st.none(), TRES), st.one_of(st.none(), TRES)),
                min_size=40, max_size=40))
def test_random_gres_is_always_decided(
        plugin: LuaPlugin, jobs: list[tuple[str, str | None, str | None]]) -> None:
    plugin.spool.write_text("")
    outcomes = plugin.run([{"job_desc": {"tres_per_node": node, "tres_per_job": job,
                                         "tres_per_task": task, "comment": node}}
                           for node, job, task in jobs])
    for (node, job, task), out in zip(jobs, outcomes, strict=True):
        assert out.rc in (0, -1)
        assert not any("internal error" in line for line in out.error), (node, job, task)
        if out.rc == -1:
            assert len(out.user) == 1 and "\n" not in out.user[0]
        elif "admin_comment" in out.job_desc:
            assert "gpupower:" in out.job_desc["tres_per_node"]
    assert len(plugin.spool_lines()) == sum(o.rc == -1 for o in outcomes)
