"""`sparkctl verify` and `sparkctl ledger ...`: exit codes, one-line errors, output."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from spark_slurm.cli import run
from spark_slurm.ledger import Ledger, export_checkpoint, verify_ledger
from tests.unit.ledger.conftest import Built, needs_shell_tools, shell_verify


def sparkctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_verify_ok_and_json_for_several_ledgers(build: Callable[..., Built],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a = build(10, name="a.db")
    b = build(12, name="b.db", rotate=False)
    code, out, err = sparkctl(capsys, "verify", str(a.path), str(b.path))
    assert code == 0 and err == ""
    assert out.count(": ok,") == 2
    code, out, _ = sparkctl(capsys, "verify", "--json", str(a.path), str(b.path))
    reports = json.loads(out)
    assert code == 0 and [r["ok"] for r in reports] == [True, True]
    assert {r["path"] for r in reports} == {str(a.path), str(b.path)}


def test_verify_bad_ledger_exits_1_naming_the_seq(build: Callable[..., Built],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a = build(10)
    conn = sqlite3.connect(a.path)
    conn.execute("UPDATE per SET hash = zeroblob(32) WHERE seq = 4")
    conn.commit()
    conn.close()
    code, out, err = sparkctl(capsys, "verify", str(a.path))
    assert code == 1
    assert err.strip() == f"sparkctl: {a.path}: first bad seq 4: hash does not match prev hash " \
                          "+ stored bytes (body or hash edited)"
    code, out, err = sparkctl(capsys, "verify", "--json", str(a.path))
    assert code == 1 and json.loads(out)[0]["first_bad_seq"] == 4


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("just text\n"), "not a ledger (not an SQLite database)"),
    (lambda p: p.write_bytes(b""), "empty file, not a ledger"),
    (lambda p: None, "no such ledger file"),
    (lambda p: sqlite3.connect(p).execute("CREATE TABLE x (y)").connection.commit(),
     "not a ledger (SQLite database without a meta table)"),
])
def test_unusable_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              make: Callable[[Path], object],
                                              message: str) -> None:
    path = tmp_path / "input.db"
    make(path)
    code, _, err = sparkctl(capsys, "verify", str(path))
    assert code == 2
    assert err == f"sparkctl: {path}: {message}\n"


def test_unknown_schema_and_wrong_keys_exit_2(build: Callable[..., Built], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a = build(6)
    run(["ledger", "keygen", str(tmp_path / "other")])
    capsys.readouterr()
    code, _, err = sparkctl(capsys, "verify", "--key", str(tmp_path / "other" / "hmac.key"),
                            str(a.path))
    assert code == 2 and "is not this ledger's key" in err and err.count("\n") == 1
    code, _, err = sparkctl(capsys, "verify", "--pubkey", str(tmp_path / "other" / "node.pub"),
                            str(a.path))
    assert code == 2 and "is not a signing key of this ledger" in err
    conn = sqlite3.connect(a.path)
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    code, _, err = sparkctl(capsys, "verify", str(a.path))
    assert code == 2 and "unknown ledger schema version '3'" in err


def test_verify_with_checkpoint_file_detects_truncation(build: Callable[..., Built],
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    a = build(10)
    cp = export_checkpoint(a.kept[0], tmp_path / "kept.cp")
    conn = sqlite3.connect(a.path)
    conn.execute("DELETE FROM per WHERE seq >= 8")
    conn.execute("DELETE FROM checkpoint")
    conn.commit()
    conn.close()
    code, _, err = sparkctl(capsys, "verify", "--checkpoint", str(cp), str(a.path))
    assert code == 1 and "first bad seq 8: ledger truncated" in err
    (tmp_path / "junk.cp").write_text("junk")
    code, _, err = sparkctl(capsys, "verify", "--checkpoint", str(tmp_path / "junk.cp"),
                            str(a.path))
    assert code == 2 and "junk.cp" in err


def test_show_filters_and_json(build: Callable[..., Built],
                               capsys: pytest.CaptureFixture[str]) -> None:
    a = build(12)
    code, out, _ = sparkctl(capsys, "ledger", "show", str(a.path))
    assert code == 0 and out.splitlines()[0].split() == ["seq", "time", "(UTC)", "kind", "job",
                                                         "hash"]
    assert "genesis" in out
    code, out, _ = sparkctl(capsys, "ledger", "show", str(a.path), "--job", "101", "--json")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["job_id"] == "101" for r in rows)
    assert rows[0]["body"]["job_id"] == "101"
    code, out, _ = sparkctl(capsys, "ledger", "show", str(a.path), "--kind", "key",
                            "--since", "3", "--json")
    assert all(r["kind"] == "key" and r["seq"] >= 3 for r in json.loads(out))


def test_snapshot_of_a_live_ledger_verifies(build: Callable[..., Built], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a = build(10)
    live = Ledger.open(a.path, node="n1", cluster="c1", clock=a.clock, epoch_seconds=60)
    live.append("cap", {"while": "open"})  # the writer is still open (WAL not folded back)
    try:
        dest = tmp_path / "copy.db"
        code, out, _ = sparkctl(capsys, "ledger", "snapshot", str(a.path), str(dest))
        assert code == 0 and f"{live.size} records" in out
        report = verify_ledger(dest, a.keys.hmac)
        assert report.ok and report.count == live.size
        code, _, err = sparkctl(capsys, "ledger", "snapshot", str(a.path), str(dest))
        assert code == 2 and "refusing to overwrite" in err
    finally:
        live.close()


def test_checkpoint_export_and_keygen(build: Callable[..., Built], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    a = build(8)
    code, out, _ = sparkctl(capsys, "ledger", "checkpoint", str(a.path))
    assert code == 0 and out.startswith("spark/c1/n1\n") and "\n— spark/c1/n1 " in out
    code, out, _ = sparkctl(capsys, "ledger", "keygen", str(tmp_path / "k"))
    assert code == 0 and out.split() == [str(tmp_path / "k" / n)
                                         for n in ("hmac.key", "node.key", "node.pub")]
    code, _, err = sparkctl(capsys, "ledger", "keygen", str(tmp_path / "k"))
    assert code == 2 and "refusing to overwrite" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["verify"], ["ledger"], ["ledger", "show"], ["ledger", "snapshot"],
                 ["ledger", "keygen"], ["ledger", "checkpoint"]):
        assert run([*args, "--help"]) == 0
        assert len(capsys.readouterr().out.splitlines()) > 3


def test_verify_in_a_real_subprocess(build: Callable[..., Built]) -> None:
    a = build(6)
    out = subprocess.run([sys.executable, "-m", "spark_slurm.cli", "verify", str(a.path)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert ": ok, " in out.stdout


@needs_shell_tools
@pytest.mark.parametrize("case", ["text", "empty", "missing", "schema", "wrongkey"])
def test_shell_verifier_refuses_unusable_input_like_sparkctl(
        build: Callable[..., Built], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    a = build(6)
    path, args = a.path, []
    if case == "text":
        path.write_text("not a ledger")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "missing":
        path = tmp_path / "missing.db"
    elif case == "schema":
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
        conn.commit()
        conn.close()
    else:
        run(["ledger", "keygen", str(tmp_path / "other")])
        args = ["--key", str(tmp_path / "other" / "hmac.key")]
    code, text = shell_verify(path, *args)
    assert code == 2, text
    assert sparkctl(capsys, "verify", *args, str(path))[0] == 2
