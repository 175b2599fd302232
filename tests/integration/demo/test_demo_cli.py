"""The demo's pieces that need no cluster: argument errors, wrappers, Prometheus config."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from spark_slurm.cli import cli, run
from spark_slurm.demo.cluster import ClusterSpec, SlurmCluster, job_id_of
from spark_slurm.demo.run import choose, node_count, prometheus_config
from spark_slurm.demo.scenarios import SCENARIOS
from spark_slurm.demo.stack import ClusterStack, StackSpec, find_repo, render_wrapper
from spark_slurm.errors import InputError, SlurmCommandFailed
from spark_slurm.slurm.runner import RunResult

REPO = Path(__file__).resolve().parents[3]


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["demo", "meltdown"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparkctl: unknown scenario 'meltdown'")
    assert "thermal" in err and "dynamic" in err
    assert "Traceback" not in err


def test_scenarios_run_in_canonical_order_whatever_was_asked() -> None:
    assert choose([]) == list(SCENARIOS)
    assert choose(["dynamic", "thermal"]) == ["thermal", "dynamic"]
    with pytest.raises(InputError):
        choose(["thermal", "nope"])


def test_the_multi_node_scenario_needs_three_nodes() -> None:
    assert "multi-node" in choose([], 3)
    assert choose([], 1) == [n for n in SCENARIOS if n != "multi-node"]
    with pytest.raises(InputError, match="'multi-node' needs --nodes 3"):
        choose(["multi-node"], 1)


def test_node_count_is_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    assert node_count(1, print) == 1              # one node needs no namespaces
    said: list[str] = []
    assert node_count(None, said.append, lambda: "cannot create a network namespace") == 1
    assert said == ["note: a multi-node cluster needs network namespaces (cannot create a "
                    "network namespace); running on one node, without the multi-node scenario"]
    assert node_count(None, said.append, lambda: None) == 3
    with pytest.raises(InputError, match="--nodes 3 needs network namespaces: no root"):
        node_count(3, print, lambda: "no root")
    with pytest.raises(InputError, match="at least 1"):
        node_count(0, print)
    assert run(["demo", "--nodes", "0", "thermal"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err


def test_stop_without_a_running_demo_says_so(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["demo", "--stop", str(tmp_path)]) == 2
    assert "no running demo recorded" in capsys.readouterr().err


def test_demo_help_names_the_scenarios_and_options() -> None:
    out = CliRunner().invoke(cli, ["demo", "--help"]).output
    for word in (*SCENARIOS, "--keep", "--stop", "--workdir", "--nodes"):
        assert word in out
    assert {"incident", "no-cap", "static-300", "partial-dynamic"} <= set(SCENARIOS)


def test_wrappers_get_every_placeholder_filled(tmp_path: Path) -> None:
    for name in ("prolog", "epilog"):
        out = render_wrapper(REPO / "slurm" / name, tmp_path / name, tmp_path / "hook.json")
        text = out.read_text()
        assert "@" not in text.replace("@@", "")
        assert str(tmp_path / "hook.json") in text
        assert out.stat().st_mode & 0o111


def test_a_wrapper_with_an_unknown_placeholder_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "prolog.in"
    template.write_text("#!/bin/sh\nexec @PYTHON@ @SOMETHING_NEW@\n")
    with pytest.raises(InputError, match="@SOMETHING_NEW@"):
        render_wrapper(template, tmp_path / "prolog", tmp_path / "hook.json")


def test_prometheus_config_points_at_the_demo_ports(tmp_path: Path) -> None:
    stack = ClusterStack(tmp_path, find_repo())
    stack.nodes[0].metrics_port, stack.exporter_port = 41001, 41002
    data = yaml.safe_load(prometheus_config(stack).read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in data["scrape_configs"]}
    assert targets == {"sparkd": ["127.0.0.1:41001"], "karman": ["127.0.0.1:41002"]}


def test_prometheus_scrapes_every_host_of_a_multi_node_stack(tmp_path: Path) -> None:
    stack = ClusterStack(tmp_path, find_repo(), StackSpec(nodes=3))
    for i, host in enumerate(stack.hosts):
        host.address = f"10.9.9.{10 + i}"
    stack.exporter_port = 9557
    data = yaml.safe_load(prometheus_config(stack).read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in data["scrape_configs"]}
    assert targets == {"sparkd": [f"10.9.9.{10 + i}:9400" for i in range(4)],
                       "karman": ["10.9.9.11:9557"]}
    assert [h.name for h in stack.hosts] == ["ctl", "n1", "n2", "n3"]
    assert stack.controller.gpus == 0 and stack.controller.spool == stack.spool
    assert all(n.spool is None and n.gpus == 8 for n in stack.nodes)


def test_find_repo_falls_back_to_this_checkout(tmp_path: Path) -> None:
    assert find_repo(tmp_path) == REPO   # falls back to the checkout this package is in
    assert (find_repo() / "contrib" / "verify-ledger.sh").is_file()


def test_cluster_config_keeps_everything_under_its_directory(tmp_path: Path) -> None:
    cluster = SlurmCluster(tmp_path, ClusterSpec(gpus=4, gpupower_w=3000, gpu_type="b200",
                                                 prolog=tmp_path / "bin" / "prolog"))
    cluster.ctld_port, cluster.slurmd_port = 40001, 40002
    conf = cluster.slurm_conf_text()
    assert "Gres=gpu:b200:4,gpupower:3000" in conf and "JobSubmitPlugins" not in conf
    assert f"Prolog={tmp_path}/bin/prolog" in conf and "PrologFlags=Alloc" in conf
    paths = [v for line in conf.splitlines() for v in [line.partition("=")[2]]
             if v.startswith("/") and v != "/bin/true"]   # MailProg
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    assert cluster.gres_conf_text() == (f"Name=gpu Type=b200 File={tmp_path}/dev/nvidia[0-3]\n"
                                        "Name=gpupower Count=3000 Flags=CountOnly\n")
    assert cluster.env["SLURM_CONF"] == str(tmp_path / "etc" / "slurm.conf")


def test_stopping_a_cluster_that_never_started_is_safe(tmp_path: Path) -> None:
    cluster = SlurmCluster(tmp_path)
    cluster.stop()
    assert cluster.procs == {}


def test_sbatch_output_without_a_job_id_is_an_error() -> None:
    with pytest.raises(SlurmCommandFailed, match="printed no job id"):
        job_id_of(RunResult(("sbatch",), 0, "Submitted nothing\n", ""))
    assert job_id_of(RunResult(("sbatch",), 0, "42;spk01\n", "")) == "42"


def test_stop_ends_the_processes_a_kept_demo_recorded(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        (tmp_path / "demo.json").write_text(json.dumps({
            "slurm_conf": str(tmp_path / "none.conf"),
            "services": [{"name": "sleeper", "pid": proc.pid}]}))
        assert run(["demo", "--stop", str(tmp_path)]) == 0
        assert f"stopped sleeper (pid {proc.pid})" in capsys.readouterr().out
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert not (tmp_path / "demo.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
