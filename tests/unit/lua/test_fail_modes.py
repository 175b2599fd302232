"""A Lua error or a missing policy never lets a job bypass policy unless fail mode is open."""

from __future__ import annotations

from pathlib import Path

from spark_slurm.policy.lua import lua_string
from tests.unit.lua.conftest import EXAMPLE_POLICY, LuaPlugin

SUCCESS, ERROR = 0, -1
OPEN = EXAMPLE_POLICY.read_text().replace("fail_mode: closed", "fail_mode: open")


def test_internal_error_refuses_the_job_when_closed(plugin: LuaPlugin) -> None:
    # A field of the wrong type makes the parser raise inside the plugin.
    out = plugin.run([{"job_desc": {"tres_per_node": {"not": "a string"}}}])[0]
    assert out.rc == ERROR
    assert out.user == ["spark: internal policy error, job refused (fail-closed)"]
    assert any("internal error in job_submit" in e for e in out.error)
    [line] = plugin.spool_lines()
    assert line["rule"] == "internal-error"


def test_internal_error_lets_the_job_through_when_open(plugin: LuaPlugin) -> None:
    plugin.install(OPEN)
    out = plugin.run([{"job_desc": {"tres_per_node": {"not": "a string"}}}])[0]
    assert out.rc == SUCCESS
    assert out.user == []
    assert any("internal error in job_submit" in e for e in out.error)


def test_missing_policy_refuses_every_job(plugin: LuaPlugin, tmp_path: Path) -> None:
    plugin.install(None)
    spool = tmp_path / "fallback.jsonl"
    plugin.prelude = f"SPARK_SPOOL_PATH = {lua_string(str(spool))}"
    out = plugin.submit()  # not even a GPU job
    assert out.rc == ERROR
    assert out.user == ["spark: job refused: power policy not loaded, job refused (fail-closed)"]
    assert any("cannot load policy" in e for e in plugin.load_log["error"])
    assert spool.read_text().count("\n") == 1


def test_a_policy_chunk_that_is_not_a_table_is_not_loaded(plugin: LuaPlugin) -> None:
    for raw in ("return 42\n", "return {\n", "error('boom')\n", "return { version = 2 }\n"):
        plugin.install(raw_lua=raw)
        plugin.prelude = "SPARK_SPOOL_PATH = '/dev/null'"
        out = plugin.submit(tres_per_node="gres:gpu:1,gres:gpupower:400")
        assert out.rc == ERROR, raw


def test_policy_path_can_be_set_before_loading(plugin: LuaPlugin, tmp_path: Path) -> None:
    elsewhere = tmp_path / "other.lua"
    (plugin.etc / "spark_policy.lua").rename(elsewhere)
    plugin.prelude = f"SPARK_POLICY_PATH = {lua_string(str(elsewhere))}"
    assert plugin.submit(tres_per_node="gres:gpu:1").rc == SUCCESS


def test_plugin_loads_and_logs_its_policy_hash(plugin: LuaPlugin) -> None:
    plugin.submit()
    [line] = plugin.load_log["info"]
    assert "spark_policy.lua sha256 " in line
