"""`sparkctl files`: every shipped file is catalogued, installed with its mode and its
placeholders filled, configs are kept, the site policy is compiled, and bad input
(a broken policy, a bad address) writes nothing and says why."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from spark_slurm.cli import cli, run
from spark_slurm.errors import InputError, PolicyError
from spark_slurm.files import Layout, catalogue, data_root, install
from spark_slurm.files.layout import allowed_address
from spark_slurm.hook import DEFAULTS, load_config
from spark_slurm.policy import Policy
from spark_slurm.policy.lua import compile_lua

REPO = Path(__file__).resolve().parents[3]
SHIPPED_TREES = ("slurm", "contrib", "etc", "docs")


def _layout(**kw: object) -> Layout:
    return Layout.current(**kw)  # type: ignore[arg-type]


def test_every_shipped_file_is_catalogued_and_present() -> None:
    root = data_root()
    assert root == REPO  # from a checkout the files are read where git keeps them
    on_disk = {str(p.relative_to(root)) for tree in SHIPPED_TREES
               for p in (root / tree).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    on_disk |= {str(p.relative_to(root)) for p in (root / "proto").glob("*.proto")}
    listed = {e.source for e in catalogue() if e.source is not None}
    assert on_disk == listed
    targets = [e.target for e in catalogue()]
    assert len(targets) == len(set(targets))


def test_install_writes_every_file_filled_in_for_this_installation(tmp_path: Path) -> None:
    layout = _layout()
    done = install(layout, tmp_path)
    assert {w.action for w in done} == {"created"}
    assert len(done) == len(catalogue())
    for w in done:
        assert w.path.is_file() and w.path == tmp_path / str(w.target).lstrip("/")
        assert w.path.stat().st_mode & 0o7777 == w.mode, w.path
        if w.kind == "template":
            assert not re.search(r"@[A-Z_]+@", w.path.read_text()), w.path
    etc = tmp_path / "etc"
    unit = (etc / "systemd/system/sparkd.service").read_text()
    assert f"ExecStart={layout.bindir}/sparkd --config /etc/spark/sparkd.yaml\n" in unit
    assert "IPAddressAllow=localhost\n" in unit
    assert "Documentation=file:///usr/local/share/doc/spark-slurm/daemon-api.md" in unit
    assert (tmp_path / "usr/local/share/doc/spark-slurm/daemon-api.md").is_file()
    merge = (etc / "systemd/system/spark-merge.service").read_text()
    assert f"Environment=SPARKCTL={layout.bindir}/sparkctl\n" in merge
    assert f"Environment=PATH={layout.bindir}:/usr/local/sbin:" in merge
    assert "ExecStart=/usr/local/libexec/spark/collect-ledgers.sh --merge\n" in merge
    assert (tmp_path / "usr/local/libexec/spark/collect-ledgers.sh").stat().st_mode & 0o111
    prolog = (etc / "slurm/spark-prolog").read_text()
    assert f"exec {sys.executable} -I -S " in prolog and "--config /etc/spark/hook.json" in prolog
    assert (etc / "slurm/job_submit.lua").read_bytes() == (REPO / "slurm/job_submit.lua"
                                                            ).read_bytes()
    assert load_config(str(etc / "spark/hook.json")) == DEFAULTS
    example = Policy.load(REPO / "etc/policy.yaml")
    lua = (etc / "slurm/spark_policy.lua").read_text()
    assert lua == compile_lua(Policy(example.data, example.text, example.sha256,
                                     "/etc/spark/policy.yaml"))


def test_running_it_again_changes_nothing_and_keeps_edited_configs(tmp_path: Path) -> None:
    install(_layout(), tmp_path)
    sparkd_yaml = tmp_path / "etc/spark/sparkd.yaml"
    sparkd_yaml.write_text("node: mine\n")
    unit = tmp_path / "etc/systemd/system/sparkd.service"
    unit.write_text("edited\n")
    again = {str(w.target): w.action for w in install(_layout(), tmp_path)}
    assert again.pop("/etc/spark/sparkd.yaml") == "kept"
    assert again.pop("/etc/spark/policy.yaml") == "kept"
    assert again.pop("/etc/spark/hook.json") == "kept"
    assert again.pop("/etc/spark/karman.yaml") == "kept"
    assert again.pop("/etc/systemd/system/sparkd.service") == "updated"
    assert set(again.values()) == {"unchanged"}
    assert sparkd_yaml.read_text() == "node: mine\n" and unit.read_text() != "edited\n"
    forced = {str(w.target): w.action for w in install(_layout(), tmp_path, force=True)}
    assert forced["/etc/spark/sparkd.yaml"] == "updated"
    assert sparkd_yaml.read_bytes() == (REPO / "etc/sparkd.yaml").read_bytes()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    done = install(_layout(), tmp_path, dry_run=True)
    assert {w.action for w in done} == {"created"}
    assert list(tmp_path.iterdir()) == []


def test_the_site_policy_is_what_gets_compiled(tmp_path: Path) -> None:
    site = tmp_path / "etc/spark/policy.yaml"
    site.parent.mkdir(parents=True)
    text = (REPO / "etc/policy.yaml").read_text()
    assert "default_watts: 500 " in text
    site.write_text(text.replace("default_watts: 500 ", "default_watts: 450 ", 1))
    install(_layout(), tmp_path)
    lua = (tmp_path / "etc/slurm/spark_policy.lua").read_text()
    assert Policy.load(site).sha256 in lua and "default_watts_per_gpu = 450," in lua
    assert Policy.load(REPO / "etc/policy.yaml").sha256 not in lua


def test_a_broken_site_policy_writes_nothing_and_names_the_problem(tmp_path: Path) -> None:
    broken = tmp_path / "policy.yaml"
    broken.write_text("version: 1\ngpu:\n  max_watts: lots\n")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(PolicyError) as err:
        install(_layout(), root, policy=broken)
    assert str(err.value).startswith(f"{broken}:3:")
    assert list(root.iterdir()) == []


def test_allowed_addresses_are_checked_and_reach_the_unit(tmp_path: Path) -> None:
    assert allowed_address("10.1.2.3") == "10.1.2.3/32"
    assert allowed_address("10.1.2.0/24") == "10.1.2.0/24"
    assert allowed_address("fd00::/8") == "fd00::/8"
    with pytest.raises(InputError, match="not an IP address"):
        allowed_address("prometheus.example")
    install(_layout(allow_ips=("10.1.2.0/24", "10.9.9.9")), tmp_path)
    unit = (tmp_path / "etc/systemd/system/sparkd.service").read_text()
    assert "IPAddressAllow=localhost 10.1.2.0/24 10.9.9.9/32\n" in unit


def test_cli_install_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["files", "install", "--root", str(tmp_path), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert f"would be created    0644 {tmp_path}/etc/slurm/job_submit.lua" in out.output
    assert list(tmp_path.iterdir()) == []
    out = runner.invoke(cli, ["files", "install", "--root", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    files = json.loads(out.output)["files"]
    assert {f["action"] for f in files} == {"created"} and len(files) == len(catalogue())
    out = runner.invoke(cli, ["files", "install", "--root", str(tmp_path)])
    assert out.output.splitlines()[-2:] == [
        f"{len(files)} files under {tmp_path}: 4 kept, {len(files) - 4} unchanged",
        "kept files are configs that already existed (--force replaces them)"]
    listed = json.loads(runner.invoke(cli, ["files", "list", "--json"]).output)
    assert listed["data_root"] == str(REPO)
    assert [f["target"] for f in listed["files"]] == [f["target"] for f in files]
    assert run(["files", "install", "--root", str(tmp_path), "--allow-ip", "x"]) == 2
    assert capsys.readouterr().err.startswith("sparkctl: --allow-ip 'x': not an IP address")


def test_rendered_health_check_runs_the_hook(tmp_path: Path) -> None:
    hook_config = tmp_path / "hook.json"
    hook_config.write_text(json.dumps({"socket": str(tmp_path / "no.sock"),
                                       "journal": str(tmp_path / "journal.jsonl")}))
    layout = Layout(bindir=Path(sys.executable).parent, python=Path(sys.executable),
                    pkgdir=REPO, hook_config=hook_config)
    install(layout, tmp_path)
    check = tmp_path / "etc/slurm/spark-nhc-check"
    done = subprocess.run([str(check)], capture_output=True, text=True, timeout=60,
                          check=False, env=dict(os.environ, SPARK_NHC_DRAIN="0"))
    assert done.returncode == 1
    assert done.stdout.startswith("spark-nhc-check: ") and "no.sock" in done.stdout


def test_a_relative_prefix_or_a_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--prefix usr/local: must be an absolute path"):
        Layout.current(Path("usr/local"))
    with pytest.raises(InputError, match="not a directory"):
        install(_layout(), tmp_path / "missing")
