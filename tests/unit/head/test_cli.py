"""The head-node commands: documented, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spark_slurm.cli import run
from tests.unit.head import tamper
from tests.unit.head.conftest import Cluster

COMMANDS = ["merge", "witness", "audit", "replay"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_documented(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.split("\n\n", 2)[1].strip()) > 20


def test_merge_json_summary_and_exit_codes(cluster: Cluster,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    db = cluster.db
    args = ["merge", "--into", str(db), "--keys", str(cluster.trust), "--json"]
    assert run([*args, str(cluster.n1)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["appended"] > 0 and doc["findings"] == []
    tamper.sql(cluster.n2, "DELETE FROM per WHERE seq = 2")
    assert run([*args, str(cluster.n1), str(cluster.n2)]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["findings"][0]["code"] == "GAP" and doc["findings"][0]["node"] == "n2"
    assert doc["findings"][0]["seq"] == 2
    assert captured.err.startswith("sparkctl: merge: findings") and "Traceback" not in captured.err


def test_merge_progress_bar_goes_to_stderr(cluster: Cluster,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["merge", "--db", cluster.db, "--progress", str(cluster.n1)]) == 0
    captured = capsys.readouterr()
    assert "merging" in captured.err and "merged" in captured.out


def test_user_errors_are_one_line_exit_2(cluster: Cluster, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    not_db = tmp_path / "x.db"
    not_db.write_text("hello")
    cases = [["audit", "1", "--db", str(not_db)],
             ["audit", "1", "--db", str(tmp_path / "missing.db")],
             ["replay", "--db", str(cluster.n1), "--at", "noon-ish"],
             ["audit", "4242", "--db", str(cluster.n1)],
             ["audit", "100", "--db", str(cluster.n1), "--plot", str(tmp_path / "a.gif")],
             ["audit", "100", "--db", str(cluster.n1), "--price-kwh", "cheap"],
             ["merge", "--into", str(tmp_path / "c.db"), "--keys", str(tmp_path / "nokeys"),
              str(cluster.n1)]]
    for args in cases:
        assert run(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("sparkctl: ") and err.count("\n") == 1 and "Traceback" not in err


def test_replay_text_output(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["replay", "--db", str(cluster.n1), "--at", str(2**62), "--recheck"]) == 0
    out = capsys.readouterr().out
    assert "n1" in out and "recheck: 2 decisions, 0 do not reproduce" in out
