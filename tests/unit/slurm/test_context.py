"""Job contexts: the admin token, the registry, the static source, the runner."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from spark_slurm.errors import (
    ConfigError,
    InputError,
    JobNotFound,
    SlurmCommandFailed,
    SlurmError,
    SlurmParseError,
)
from spark_slurm.slurm import JobContext, open_context_source, parse_admin_token
from spark_slurm.slurm.admin_token import comment_class
from spark_slurm.slurm.context import build_context
from spark_slurm.slurm.pyslurm_source import fields_from_job
from spark_slurm.slurm.runner import SubprocessRunner, check
from spark_slurm.slurm.scontrol import ScontrolSource
from spark_slurm.slurm.static import StaticSource


def test_admin_token_fields() -> None:
    tok = parse_admin_token("note; spark:v=1,watts=1600,gpus=4,wpg=400,class=training,"
                            "rule=tenant-a,policy=abcdef0123456789,injected=1,future=x")
    assert tok is not None
    assert (tok.v, tok.watts, tok.gpus, tok.wpg) == (1, 1600, 4, 400)
    assert tok.workload_class == "training" and tok.rule == "tenant-a" and tok.injected
    assert tok.extra == {"future": "x"}
    assert parse_admin_token("no token here") is None
    assert parse_admin_token(None) is None


def test_admin_token_with_bad_number_names_the_key() -> None:
    with pytest.raises(SlurmParseError, match="watts='lots'"):
        parse_admin_token("spark:v=1,watts=lots")


def test_user_comment_class_is_lenient() -> None:
    assert comment_class("spark:class=inference") == "inference"
    assert comment_class("my own spark:notes") is None
    assert comment_class("just words") is None


def test_registry_names() -> None:
    assert isinstance(open_context_source("scontrol"), ScontrolSource)
    assert isinstance(open_context_source("static"), StaticSource)
    with pytest.raises(InputError, match="unknown job context source 'slurmrestd'"):
        open_context_source("slurmrestd")


def test_auto_falls_back_to_scontrol_without_pyslurm() -> None:
    if "pyslurm" in sys.modules or _importable("pyslurm"):
        pytest.skip("pyslurm is installed here")
    assert isinstance(open_context_source("auto"), ScontrolSource)
    with pytest.raises(SlurmError, match="cannot import pyslurm"):
        open_context_source("pyslurm")


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_static_source_from_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps({"12": {"user": "alice", "uid": 1001, "account": "a",
                                       "node_gpus": {"n1": [0, 1]},
                                       "gpupower_w_per_node": 800}}))
    src = StaticSource(path=path)
    ctx = src.get("12")
    assert ctx.node_gpus == {"n1": [0, 1]} and ctx.gpupower_w_per_node == 800
    assert ctx.as_record()["account"] == "a"
    with pytest.raises(JobNotFound):
        src.get("13")


def test_static_source_bad_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    path.write_text('{"12": {"uid": 1}}')
    with pytest.raises(ConfigError, match=r"jobs.json: job 12: missing 'user'"):
        StaticSource(path=path).get("12")
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not JSON"):
        StaticSource(path=path).get("12")


def test_static_source_in_memory() -> None:
    ctx = JobContext("5", "bob", 2000, None, "gpu", None, None, None, {"n": [3]}, 400)
    assert StaticSource([ctx]).get("5") is ctx


def test_subprocess_runner_real_commands() -> None:
    runner = SubprocessRunner(timeout_s=5)
    res = runner.run([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"])
    assert res.returncode == 3 and res.stdout == "hi\n"
    with pytest.raises(SlurmCommandFailed, match="exited 3"):
        check(res)
    with pytest.raises(SlurmCommandFailed, match="not found"):
        runner.run(["/nonexistent/scontrol", "ping"])
    with pytest.raises(SlurmCommandFailed, match=r"timed out after 0\.2s"):
        runner.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout_s=0.2)


class _JobLike:
    """The attributes pyslurm 23.02+'s `Job` exposes that the source reads."""

    id = 31
    user_id = 1001
    user_name = "alice"
    group_id = 1001
    account = "physics"
    partition = "gpu"
    qos = "normal"
    state = "RUNNING"
    comment = "spark:class=training"
    admin_comment = "spark:v=1,watts=800,gpus=2,wpg=400,class=training,rule=r,policy=p,injected=0"
    gres_per_node: ClassVar[dict[str, int]] = {"gpu": 2, "gpupower": 800}
    nodes = "n[1-2]"
    gres_detail = ("gpu:2(IDX:0-1),gpupower(CNT:800)", "gpu:2(IDX:2-3),gpupower(CNT:800)")


def test_pyslurm_job_maps_to_the_same_context_as_scontrol() -> None:
    fields, node_gres = fields_from_job(_JobLike())
    ctx = build_context(fields, node_gres, "31")
    assert ctx.job_id == "31" and ctx.user == "alice" and ctx.uid == 1001 and ctx.gid == 1001
    assert ctx.account == "physics" and ctx.qos == "normal"
    assert ctx.node_gpus == {"n1": [0, 1], "n2": [2, 3]}
    assert ctx.gpupower_w_per_node == 800 and ctx.workload_class == "training"
