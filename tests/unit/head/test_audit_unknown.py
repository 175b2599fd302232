"""An audit of a job the ledger never saw names the file the user gave, on either kind
of ledger (a node ledger is audited through an in-memory copy whose name means nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from spark_slurm.cli import cli, run
from spark_slurm.clock import ManualClock
from tests.unit.head.builders import build_node


def test_unknown_job_on_a_node_ledger_names_the_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = build_node(tmp_path, "n1", tmp_path / "trust", ManualClock(),
                      [("100", [0], {0: 1000})])
    assert run(["audit", "999", "--db", str(node)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"sparkctl: job 999: no records in {node}"
    assert ":memory:" not in err


def test_unknown_job_on_a_merged_ledger_names_it_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = build_node(tmp_path, "n1", tmp_path / "trust", ManualClock(),
                      [("100", [0], {0: 1000})])
    cluster = tmp_path / "cluster.db"
    merged = CliRunner().invoke(cli, ["merge", "--into", str(cluster), str(node)])
    assert merged.exit_code == 0, merged.output
    assert run(["audit", "100", "--db", str(cluster)]) == 0
    capsys.readouterr()
    assert run(["audit", "999", "--db", str(cluster)]) == 2
    assert capsys.readouterr().err.strip() == f"sparkctl: job 999: no records in {cluster}"
