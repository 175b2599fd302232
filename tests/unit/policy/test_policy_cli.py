"""`sparkctl policy check|compile`: through the real CLI entry point and a real subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.policy import Policy

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "etc" / "policy.yaml"
BROKEN = ROOT / "tests" / "data" / "policy" / "broken.yaml"


def test_check_valid_policy_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{EXAMPLE}: ok, sha256 {Policy.load(EXAMPLE).sha256[:16]}, 3 rules")


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "check", str(EXAMPLE), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["rules"] == 3 and data["fail_mode"] == "closed"


def test_check_lists_every_error_as_file_line_col(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "check", str(BROKEN)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"sparkctl: {BROKEN}: 14 errors in policy"
    listed = err[:-1]
    assert len(listed) == 14
    assert f"{BROKEN}:7:3: gpu: unknown key 'max_wats'; did you mean 'max_watts'?" in listed
    assert f"{BROKEN}:20:5: rule 'first': duplicate rule id (first at line 17)" in listed
    assert "Traceback" not in "\n".join(err)


def test_check_json_lists_errors_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "check", str(BROKEN), "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and len(data["errors"]) == 14
    assert data["errors"][0] == {"line": 4, "column": 18,
                                 "message": "gpu: default 500 W is below minimum 800 W"}


def test_check_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert run(["policy", "check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}:1:1: cannot read policy: No such file or directory" in err


def test_compile_writes_a_lua_table_that_lua_can_load(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spark_policy.lua"
    assert run(["policy", "compile", str(EXAMPLE), "--lua", str(out),
                "--spool", str(tmp_path / "d.jsonl")]) == 0
    assert "compiled from" in capsys.readouterr().out
    text = out.read_text()
    assert f'policy_sha256 = "{Policy.load(EXAMPLE).sha256}"' in text
    assert f'spool = "{tmp_path / "d.jsonl"}"' in text
    lua = shutil.which("lua5.1") or shutil.which("lua")
    if lua is None:
        pytest.skip("no Lua interpreter")
    probe = (f"local p = dofile({json.dumps(str(out))}); "
             "print(p.version, p.default_watts_per_gpu, #p.rules, p.rules[2].id, "
             "p.tenants.students.max_gpus, p.classes.training.default_watts_per_gpu, p.fail_mode)")
    proc = subprocess.run([lua, "-e", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["1", "500", "3", "night-shift-cap", "2", "650", "closed"]


def test_compile_refuses_a_broken_policy_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spark_policy.lua"
    assert run(["policy", "compile", str(BROKEN), "--lua", str(out)]) == 2
    assert not out.exists()
    assert "14 errors in policy" in capsys.readouterr().err


def test_compile_to_an_unwritable_place_is_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "no" / "such" / "dir" / "p.lua"
    assert run(["policy", "compile", str(EXAMPLE), "--lua", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparkctl: {out}: cannot write compiled policy")


def test_compile_without_lua_option_is_a_usage_error() -> None:
    assert run(["policy", "compile", str(EXAMPLE)]) == 2


def test_console_script_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "spark_slurm.cli", "policy", "check",
                           str(BROKEN)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count(f"{BROKEN}:") == 15  # 14 errors + the summary line
