"""`scontrol update` may not change the power request, a governed job's GPUs, class or token."""

from __future__ import annotations

import pytest

from tests.unit.lua.conftest import LuaPlugin

SUCCESS, ERROR = 0, -1
TOKEN = ("spark:v=1,watts=800,gpus=2,wpg=400,class=training,rule=gpu-limits,"
         "policy=0123456789abcdef,injected=0")
GOVERNED = {"job_id": 42, "admin_comment": f"ticket-1 {TOKEN}", "comment": "spark:class=training"}


@pytest.mark.parametrize("field", ["tres_per_node", "tres_per_job", "tres_per_task", "gres"])
def test_changing_gpupower_is_refused(plugin: LuaPlugin, field: str) -> None:
    out = plugin.modify({field: "gres:gpupower:5000"}, {"job_id": 7})
    assert out.rc == ERROR
    assert out.user == ["spark: update refused: the power request (gpupower) cannot be changed "
                        "with scontrol update ('gres:gpupower:5000'); use `sparkctl cap --job "
                        "JOB --watts W`"]
    assert any("refused update of job 7 by uid 1000" in e for e in out.error)


def test_changing_the_gpus_of_a_governed_job_is_refused(plugin: LuaPlugin) -> None:
    out = plugin.modify({"tres_per_node": "gres:gpu:8"}, GOVERNED)
    assert out.rc == ERROR
    assert "GPUs of a power-governed job" in out.user[0]


def test_changing_the_class_is_refused_but_keeping_it_is_fine(plugin: LuaPlugin) -> None:
    out = plugin.modify({"comment": "spark:class=inference"}, GOVERNED)
    assert out.rc == ERROR and "workload class" in out.user[0]
    assert plugin.modify({"comment": "rerun spark:class=training"}, GOVERNED).rc == SUCCESS


def test_rewriting_the_token_is_refused(plugin: LuaPlugin) -> None:
    forged = TOKEN.replace("watts=800", "watts=5000")
    assert plugin.modify({"admin_comment": forged}, GOVERNED).rc == ERROR
    assert plugin.modify({"admin_comment": "cleared"}, GOVERNED).rc == ERROR
    assert plugin.modify({"admin_comment": f"note {TOKEN}"}, GOVERNED).rc == SUCCESS


def test_other_updates_pass(plugin: LuaPlugin) -> None:
    assert plugin.modify({"time_limit": 60}, GOVERNED).rc == SUCCESS
    assert plugin.modify({"tres_per_node": "gres:gpu:8"}, {"job_id": 9}).rc == SUCCESS
    assert plugin.modify({"tres_per_node": "gres:gpupowerful:1"}, GOVERNED).rc == ERROR


def test_an_error_in_modify_is_refused_when_closed(plugin: LuaPlugin) -> None:
    out = plugin.modify({"tres_per_node": "gres:gpu:8"},
                        {"job_id": 1, "admin_comment": {"not": "a string"}})
    assert out.rc == SUCCESS  # no token can be read from a non-string: not governed
    out = plugin.modify({"tres_per_node": {"bad": 1}}, GOVERNED)
    assert out.rc == ERROR
    assert out.user == ["spark: internal policy error, update refused (fail-closed)"]
