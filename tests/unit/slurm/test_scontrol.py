"""scontrol output recorded from the real test cluster (tests/data/slurm/), parsed
into job contexts; the runner is a replay of recorded command results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from spark_slurm.clock import ManualClock
from spark_slurm.errors import JobNotFound, SlurmCommandFailed, SlurmParseError
from spark_slurm.slurm.context import build_context
from spark_slurm.slurm.runner import RunResult
from spark_slurm.slurm.scontrol import ScontrolSource, parse_json_jobs, parse_show_job

DATA = Path(__file__).parents[2] / "data" / "slurm"


class ReplayRunner:
    """Answers each command from a table keyed on whether `--json` was asked for."""

    def __init__(self, text: RunResult, json_result: RunResult | None = None) -> None:
        self.text = text
        self.json = json_result or RunResult((), 1, "", "scontrol: unrecognized option '--json'")
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], timeout_s: float | None = None) -> RunResult:
        self.calls.append(list(argv))
        return self.json if "--json" in argv else self.text


def ok(text: str) -> RunResult:
    return RunResult((), 0, text, "")


def context_of(name: str) -> object:
    [job] = parse_show_job((DATA / name).read_text())
    return build_context(job.fields, job.node_gres, "?")


@pytest.mark.parametrize("layout", ["oneline", "multiline"])
def test_gres_and_power_job(layout: str) -> None:
    [job] = parse_show_job((DATA / f"gres_gpu2_power800.{layout}.txt").read_text())
    ctx = build_context(job.fields, job.node_gres, "1")
    assert ctx.job_id == "1" and ctx.user == "root" and ctx.uid == 0 and ctx.gid == 0
    assert ctx.partition == "gpu" and ctx.account is None and ctx.qos is None
    assert ctx.node_gpus == {"vm": [0, 1]}
    assert ctx.gpupower_w_per_node == 800
    assert ctx.workload_class == "training"
    assert ctx.state == "RUNNING"


@pytest.mark.parametrize("name,gpus,watts,partition,state", [
    ("gpus_per_task.multiline.txt", [2, 3], None, "gpu", "RUNNING"),
    ("gpus_typed_none.oneline.txt", [4, 5, 6], None, "gpu", "RUNNING"),
    ("gres_power_only.multiline.txt", None, 300, "debug", "RUNNING"),
    ("no_gres.oneline.txt", None, None, "gpu", "RUNNING"),
    ("pending_held.multiline.txt", None, 500, "gpu", "PENDING"),
])
def test_recorded_jobs(name: str, gpus: list[int] | None, watts: int | None, partition: str,
                       state: str) -> None:
    [job] = parse_show_job((DATA / name).read_text())
    ctx = build_context(job.fields, job.node_gres, "x")
    assert ctx.gpus_on("vm") == (gpus or [])
    assert ctx.gpupower_w_per_node == watts
    assert ctx.partition == partition and ctx.state == state


def test_job_name_with_spaces_survives_one_line_output() -> None:
    [job] = parse_show_job((DATA / "no_gres.oneline.txt").read_text())
    assert job.fields["JobName"] == "plain job"


def test_admin_token_is_read() -> None:
    [job] = parse_show_job((DATA / "admin_comment.oneline.txt").read_text())
    ctx = build_context(job.fields, job.node_gres, "1")
    assert ctx.token is not None
    assert (ctx.token.watts, ctx.token.gpus, ctx.token.wpg) == (800, 2, 400)
    assert ctx.token.rule == "r1" and ctx.token.policy == "0123456789abcdef"
    assert ctx.token.injected is False


def test_multinode_folded_nodes_and_free_text() -> None:
    [job] = parse_show_job((DATA / "constructed_multinode.oneline.txt").read_text())
    ctx = build_context(job.fields, job.node_gres, "77")
    assert ctx.node_gpus == {"g01": [0, 1], "g02": [0, 1], "g03": [4, 6]}
    assert ctx.user == "bob" and ctx.uid == 2001 and ctx.gid == 3000
    assert ctx.account == "physics" and ctx.qos == "normal" and ctx.partition == "gpu"
    assert job.fields["JobName"] == "big run x=1"
    assert job.fields["StdOut"] == "/home/bob/out %j.txt"
    assert ctx.workload_class == "inference"       # the admin token wins over the comment
    assert ctx.token is not None and ctx.token.injected


def test_json_layout_matches_text_layout() -> None:
    [job] = parse_json_jobs((DATA / "constructed_scontrol_json.json").read_text())
    ctx = build_context(job.fields, job.node_gres, "88")
    assert ctx.node_gpus == {"n1": [0, 1, 2, 3], "n2": [4, 5, 6, 7]}
    assert ctx.user == "carol" and ctx.uid == 3003 and ctx.qos == "high"
    assert ctx.gpupower_w_per_node == 1600 and ctx.state == "RUNNING"


def test_source_falls_back_to_text_once_and_caches() -> None:
    clock = ManualClock()
    runner = ReplayRunner(ok((DATA / "gres_gpu2_power800.multiline.txt").read_text()))
    src = ScontrolSource(runner, ttl_s=2.0, clock=clock)
    first = src.get("1")
    assert first.node_gpus == {"vm": [0, 1]}
    assert [("--json" in c) for c in runner.calls] == [True, False]
    assert src.get("1") is first                       # cached
    clock.advance(3)
    src.get("1")
    assert [("--json" in c) for c in runner.calls] == [True, False, False]   # no re-probe


def test_source_uses_json_when_offered() -> None:
    runner = ReplayRunner(ok("unused"), ok((DATA / "constructed_scontrol_json.json").read_text()))
    src = ScontrolSource(runner)
    assert src.get("88").gpupower_w_per_node == 1600
    assert all("--json" in c for c in runner.calls)


def test_unknown_job_is_job_not_found() -> None:
    gone = RunResult((), 1, "", "slurm_load_jobs error: Invalid job id specified\n")
    src = ScontrolSource(ReplayRunner(gone, gone))
    with pytest.raises(JobNotFound, match="Slurm job 99: not found"):
        src.get("99")


def test_broken_controller_is_command_failed() -> None:
    down = RunResult(("scontrol",), 1, "", "slurm_load_jobs error: Unable to contact slurm "
                     "controller (connect failure)\n")
    src = ScontrolSource(ReplayRunner(down), use_json=False)
    with pytest.raises(SlurmCommandFailed, match="Unable to contact"):
        src.get("5")


@pytest.mark.parametrize("bad", ["", "12; rm -rf /", "abc", "-1"])
def test_bad_job_ids_never_reach_scontrol(bad: str) -> None:
    runner = ReplayRunner(ok(""))
    with pytest.raises(SlurmParseError, match="job id"):
        ScontrolSource(runner).get(bad)
    assert runner.calls == []


def test_garbage_output_is_a_parse_error() -> None:
    with pytest.raises(SlurmParseError, match="does not start with JobId="):
        parse_show_job("Welcome to Slurm\nJobId=1\n")
