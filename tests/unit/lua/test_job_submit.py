"""job_submit.lua against etc/policy.yaml, with job_desc shapes slurmctld 22.05 hands it.

etc/policy.yaml: site 200-700 W/GPU (over max: deny), default 500 W/GPU, node max
5600 W; tenant physics max 600 (clamp); students max 350, 2 GPUs, deny; partition
debug max 300 W/GPU and 1 GPU; class training default 650; inference default 300,
max 400 (deny); rule no-gpus-on-login denies partition login.
"""

from __future__ import annotations

from typing import Any

import pytest

from spark_slurm.policy import Policy
from tests.unit.lua.conftest import EXAMPLE_POLICY, LuaPlugin, RawLua

SUCCESS, ERROR = 0, -1


def test_gres_with_power_is_admitted_unchanged_with_a_token(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:2,gres:gpupower:800")
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:gpu:2,gres:gpupower:800"
    tok = out.token
    assert tok == {"v": "1", "watts": "800", "gpus": "2", "wpg": "400", "class": "-",
                   "rule": "gpu-limits", "policy": tok["policy"], "injected": "0"}
    assert len(tok["policy"]) == 16
    assert out.user == []
    assert plugin.spool_lines() == []


def test_token_carries_the_policy_hash_prefix(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:1,gres:gpupower:400")
    assert out.token["policy"] == Policy.load(EXAMPLE_POLICY).sha256[:16]


@pytest.mark.parametrize(("fields", "tres_after", "gpus"), [
    ({"tres_per_node": "gres:gpu:h100:4"}, "gres:gpu:h100:4,gres:gpupower:2000", 4),
    ({"tres_per_node": "gres:gpu:2"}, "gres:gpu:2,gres:gpupower:1000", 2),  # --gpus-per-node
    ({"tres_per_node": "gres/gpu:4"}, "gres/gpu:4,gres/gpupower:2000", 4),  # newer Slurm
    ({"tres_per_node": "gres:gpu"}, "gres:gpu,gres:gpupower:500", 1),
    ({"tres_per_job": "gres:gpu:2"}, "gres:gpupower:1000", 2),  # --gpus=2, one node
    ({"tres_per_job": "gres:gpu:h100:2", "min_nodes": 1, "max_nodes": 1},
     "gres:gpupower:1000", 2),
    ({"tres_per_task": "gres:gpu:1", "num_tasks": 2}, "gres:gpupower:1000", 2),
    ({"tres_per_task": "gres:gpu:2", "num_tasks": 8, "ntasks_per_node": 2, "min_nodes": 4},
     "gres:gpupower:2000", 4),
    ({"tres_per_node": "gres:gpu:2,gres:nvme:1"}, "gres:gpu:2,gres:nvme:1,gres:gpupower:1000", 2),
])
def test_default_power_is_injected_for_gpu_jobs_that_ask_for_none(
        plugin: LuaPlugin, fields: dict[str, Any], tres_after: str, gpus: int) -> None:
    out = plugin.submit(**fields)
    assert out.rc == SUCCESS, out.user
    assert out.job_desc["tres_per_node"] == tres_after
    assert out.token["injected"] == "1"
    assert out.token["gpus"] == str(gpus)
    assert out.token["wpg"] == "500"
    assert out.token["rule"] == "gpu-limits"


def test_unset_numbers_arrive_as_no_val_and_count_as_unset(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_job="gres:gpu:3", min_nodes=4294967294,
                        max_nodes=4294967294, num_tasks=4294967294, ntasks_per_node=65534)
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:gpupower:1500"


def test_power_order_and_prefix_do_not_matter(plugin: LuaPlugin) -> None:
    for tres in ("gres:gpupower:800,gres:gpu:2", "gres/gpu:2,gres/gpupower:800",
                 "gpu:2,gpupower:800"):
        out = plugin.submit(tres_per_node=tres)
        assert out.rc == SUCCESS, (tres, out.user)
        assert out.job_desc["tres_per_node"] == tres
        assert (out.token["watts"], out.token["gpus"]) == ("800", "2")


def test_non_gpu_jobs_pass_untouched(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:nvme:1")
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:nvme:1"
    assert "admin_comment" not in out.job_desc
    assert plugin.submit().rc == SUCCESS


def test_gpupower_is_never_counted_as_gpus(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpupower:300")
    assert out.rc == ERROR
    assert out.user == ["spark: job refused: 'gres:gpupower:300' asks for power but no GPUs; "
                        "use --gres=gpu:N,gpupower:W in one --gres (a second --gres replaces "
                        "the first)"]
    [line] = plugin.spool_lines()
    assert line["rule"] == "power-without-gpus"
    assert line["request"]["gpus"] == 0
    assert line["request"]["watts"] == 300


def test_duplicate_gres_where_only_power_survives_is_denied_with_a_hint(
        plugin: LuaPlugin) -> None:
    # `--gres=gpu:2 --gres=gpupower:800`: Slurm keeps only the later flag.
    out = plugin.submit(tres_per_node="gres:gpupower:800")
    assert out.rc == ERROR
    assert "a second --gres replaces the first" in out.user[0]


@pytest.mark.parametrize(("tres", "rule", "says"), [
    ("gres:gpu:2,gres:gpupower:0", "request-invalid", "gpupower must be at least 1 W"),
    ("gres:gpu:2,gres:gpupower:abc", "request-invalid", "'abc' is not a whole number of watts"),
    ("gres:gpu:2,gres:gpupower:-5", "request-invalid", "'-5' is not a whole number of watts"),
    ("gres:gpu:2,gres:gpupower:1e3", "request-invalid", "not a whole number"),
    ("gres:gpu:2,gres:gpupower:0x400", "request-invalid", "not a whole number"),
    ("gres:gpu:2,gres:gpupower", "request-invalid", "needs a whole number of node watts"),
    ("gres:gpu:1,gres:gpupower:99999999", "gpu-limits",
     "gpupower:99999999 for 1 GPU(s) per node is above the maximum 700 W (700 W/GPU, "
     "rule gpu-limits)"),
    ("gres:gpu:1,gres:gpupower:123456789012", "request-invalid", "not a plausible power"),
    ("gres:gpu:2,gres:gpupower:800,gres:gpupower:900", "request-invalid", "given twice"),
    ("gres:gpu:h100:2x,gres:gpupower:800", "request-invalid", "cannot read the GPU count"),
])
def test_bad_power_requests_are_refused_with_a_specific_line(
        plugin: LuaPlugin, tres: str, rule: str, says: str) -> None:
    out = plugin.submit(tres_per_node=tres)
    assert out.rc == ERROR
    assert len(out.user) == 1 and out.user[0].startswith("spark: job refused: ")
    assert says in out.user[0]
    [line] = plugin.spool_lines()
    assert line["rule"] == rule
    assert line["decision"] == "deny"
    assert line["request"]["tres_per_node"] == tres
    assert "admin_comment" not in out.job_desc


def test_power_in_tres_per_job_is_refused(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_job="gres:gpu:2,gres:gpupower:800")
    assert out.rc == ERROR
    assert "ask for it per node" in out.user[0]


def test_multi_node_gpus_without_a_per_node_count_are_refused(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_job="gres:gpu:4", min_nodes=2)
    assert out.rc == ERROR
    assert "--gres=gpu:N,gpupower:W" in out.user[0]
    assert plugin.spool_lines()[0]["rule"] == "gpus-per-node-unknown"
    out = plugin.submit(tres_per_task="gres:gpu:1", num_tasks=8, min_nodes=2, max_nodes=4)
    assert out.rc == ERROR


def test_spool_line_has_the_full_context(plugin: LuaPlugin) -> None:
    out = plugin.submit(uid=4242, tres_per_node="gres:gpu:1,gres:gpupower:99999999",
                        account="physics", partition="gpu", name="big \"run\"",
                        user_name="bob", comment="line1\nline2 spark:class=training")
    assert out.rc == ERROR
    [line] = plugin.spool_lines()
    assert isinstance(line.pop("time_ns"), int)
    assert len(line.pop("policy_sha256")) == 64
    assert line == {
        "v": 1, "decision": "deny", "rule": "gpu-limits",
        "reason": line["reason"], "user_id": 4242, "user": "bob", "account": "physics",
        "partition": "gpu", "job_name": 'big "run"',
        "request": {"gpus": 1, "watts": 99999999,
                    "tres_per_node": "gres:gpu:1,gres:gpupower:99999999",
                    "tres_per_job": None, "tres_per_task": None,
                    # what the policy decided on, for replay --recheck
                    "partitions": "gpu", "qos": None, "class": "training"},
        "comment": "line1\nline2 spark:class=training",
    }


def test_spool_line_stays_json_with_bytes_that_are_not_utf8(plugin: LuaPlugin) -> None:
    out = plugin.run([{"job_desc": {"tres_per_node": "gres:gpupower:1",
                                    "comment": RawLua('"caf\\233 \\226\\130\\172"')}}])[0]
    assert out.rc == ERROR
    [line] = plugin.spool_lines()
    assert line["comment"] == "caf? ???"


def test_utf8_in_the_spool_is_kept(plugin: LuaPlugin) -> None:
    plugin.submit(tres_per_node="gres:gpupower:1", comment="café €")
    assert plugin.spool_lines()[0]["comment"] == "café €"


def test_clamp_rewrites_the_power_and_tells_the_user(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:2,gres:gpupower:1300", account="physics")
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:gpu:2,gres:gpupower:1200"
    assert out.token["rule"] == "tenant:physics"
    assert out.token["wpg"] == "600"
    assert out.user == ["spark: gpupower:1300 for 2 GPU(s) per node clamped to 1200 W "
                        "(rule tenant:physics)"]


def test_below_minimum_is_raised(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:4,gres:gpupower:100")
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:gpu:4,gres:gpupower:800"
    assert out.token["rule"] == "gpu-limits"


def test_class_from_the_comment_sets_default_and_limits(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:2", comment="nightly spark:class=inference")
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:gpu:2,gres:gpupower:600"
    assert (out.token["class"], out.token["rule"]) == ("inference", "class:inference")
    out = plugin.submit(tres_per_node="gres:gpu:2,gres:gpupower:1000",
                        comment="spark:class=inference")
    assert out.rc == ERROR
    assert "(400 W/GPU, rule class:inference)" in out.user[0]


def test_tenant_partition_and_rule_denials(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:4", account="students")
    assert out.rc == ERROR and "above the limit of 2 (rule tenant:students)" in out.user[0]
    out = plugin.submit(tres_per_node="gres:gpu:1", partition="login")
    assert out.rc == ERROR and "the login partition has no GPUs" in out.user[0]
    out = plugin.submit(tres_per_node="gres:gpu:1", account="students",
                        comment="spark:class=training")
    assert out.rc == ERROR and "(rule students-no-training)" in out.user[0]
    assert [x["rule"] for x in plugin.spool_lines()] == [
        "tenant:students", "no-gpus-on-login", "students-no-training"]


def test_default_partition_from_part_list_applies_when_none_given(plugin: LuaPlugin) -> None:
    parts = {"1": {"name": "batch", "flag_default": 0}, "2": {"name": "debug", "flag_default": 1}}
    out = plugin.submit(part_list=parts, tres_per_node="gres:gpu:2")
    assert out.rc == ERROR
    assert "(rule partition:debug)" in out.user[0]


def test_existing_admin_comment_is_kept(plugin: LuaPlugin) -> None:
    out = plugin.submit(tres_per_node="gres:gpu:1", admin_comment="ticket-17")
    assert out.job_desc["admin_comment"].startswith("ticket-17 spark:v=1,watts=500,")


def test_a_spool_that_cannot_be_written_still_denies(plugin: LuaPlugin) -> None:
    plugin.spool.parent.rmdir()
    out = plugin.submit(tres_per_node="gres:gpupower:5")
    assert out.rc == ERROR
    assert any("cannot append to denial spool" in e for e in out.error)


def test_a_policy_without_rules_loads_and_admits(plugin: LuaPlugin) -> None:
    # Sections only, no `rules:`: the compiled table still has a rules list to walk.
    plugin.install("gpu: {min_watts: 100, max_watts: 500, default_watts: 300}\n"
                   "tenants:\n  physics: {max_watts_per_gpu: 400}\n")
    out = plugin.submit(account="physics", tres_per_node="gres:gpu:2")
    assert not plugin.load_log["error"]  # an empty Lua table reads back as {}
    assert out.rc == SUCCESS
    assert out.job_desc["tres_per_node"] == "gres:gpu:2,gres:gpupower:600"
    assert (out.token["rule"], out.token["injected"]) == ("gpu-limits", "1")
