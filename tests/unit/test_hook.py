"""spark-hook against a real unix socket: requests, replies, journal, exit codes."""

from __future__ import annotations

import ast
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_slurm import hook

HOOK_FILE = Path(hook.__file__)

SLURM_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_USER": "alice", "SLURM_JOB_UID": "1001",
    "SLURM_JOB_GID": "1001", "SLURM_JOB_PARTITION": "gpu",
    "SLURM_JOB_COMMENT": "spark:class=training", "SLURMD_NODENAME": "n1",
    "SLURM_CLUSTER_NAME": "spark", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
}


class FakeDaemon:
    """A real socket server that answers each request line with `reply` (or misbehaves)."""

    def __init__(self, path: Path, reply: Any = None, mode: str = "answer") -> None:
        self.path = path
        self.reply = reply if reply is not None else {"ok": True, "seq": 7}
        self.mode = mode
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while b"\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data:
                    self.requests.append(json.loads(data.split(b"\n")[0]))
                if self.mode == "silent":
                    self.stop.wait(3)
                elif self.mode == "garbage":
                    conn.sendall(b"this is not json\n")
                elif self.mode == "answer":
                    conn.sendall(json.dumps(self.reply).encode() + b"\n")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    # unix socket paths are limited to ~108 bytes; pytest tmp paths can be longer
    short = Path("/tmp") / f"spk-{os.urandom(4).hex()}.sock"
    yield short
    short.unlink(missing_ok=True)


def config(tmp_path: Path, sock: Path, **over: Any) -> dict[str, Any]:
    cfg = {"socket": str(sock), "journal": str(tmp_path / "j" / "journal.jsonl"),
           "timeout_s": 1.0, "on_daemon_down": "fail_open"}
    cfg.update(over)
    return cfg


def journal_lines(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(cfg["journal"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_prolog_sends_slurm_environment_and_exits_zero_on_ok(tmp_path: Path,
                                                               sock_path: Path) -> None:
    daemon = FakeDaemon(sock_path)
    try:
        code = hook.run("prolog", {**SLURM_ENV, "SLURM_JOB_GPUS": "0,2-3"},
                        config(tmp_path, sock_path))
    finally:
        daemon.close()
    assert code == 0
    [req] = daemon.requests
    assert req["op"] == "prolog" and req["job_id"] == "4242"
    assert req["user"] == "alice" and req["uid"] == 1001 and req["gid"] == 1001
    assert req["partition"] == "gpu" and req["node"] == "n1"
    assert req["comment"] == "spark:class=training"
    assert req["gpus"] == [0, 2, 3]
    assert req["id"].startswith("prolog-4242-")
    assert "account" not in req   # absent in slurmd's env without accounting


def test_gpus_are_omitted_when_slurm_does_not_set_them(tmp_path: Path,
                                                       sock_path: Path) -> None:
    daemon = FakeDaemon(sock_path)
    try:
        assert hook.run("epilog", SLURM_ENV, config(tmp_path, sock_path)) == 0
    finally:
        daemon.close()
    assert "gpus" not in daemon.requests[0]
    assert daemon.requests[0]["op"] == "epilog"


def test_daemon_refusal_fails_the_prolog_with_its_reason(tmp_path: Path,
                                                         sock_path: Path) -> None:
    daemon = FakeDaemon(sock_path, reply={"ok": False, "seq": 9,
                                          "error": "denied: over tenant limit"})
    err = io.StringIO()
    try:
        code = hook.run("prolog", SLURM_ENV, config(tmp_path, sock_path), err)
    finally:
        daemon.close()
    assert code == 1
    assert "over tenant limit" in err.getvalue()
    assert journal_lines(config(tmp_path, sock_path)) == []   # the daemon recorded it


@pytest.mark.parametrize("mode,code", [("fail_open", 0), ("fail_closed", 1)])
def test_missing_socket_journals_and_honours_fail_mode(tmp_path: Path, sock_path: Path,
                                                       mode: str, code: int) -> None:
    cfg = config(tmp_path, sock_path, on_daemon_down=mode)
    err = io.StringIO()
    assert hook.run("prolog", SLURM_ENV, cfg, err) == code
    [entry] = journal_lines(cfg)
    assert entry["op"] == "prolog" and entry["job_id"] == "4242"
    assert entry["hook_exit"] == mode
    assert "does not exist" in entry["error"]
    assert isinstance(entry["journaled_ns"], int)
    assert "journaled" in err.getvalue()


def test_refused_connection_is_journaled(tmp_path: Path, sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))      # bound but never listening: connect is refused
    cfg = config(tmp_path, sock_path)
    try:
        assert hook.run("epilog", SLURM_ENV, cfg, io.StringIO()) == 0
    finally:
        dead.close()
    assert "refused" in journal_lines(cfg)[0]["error"]


def test_silent_daemon_hits_the_hard_timeout(tmp_path: Path, sock_path: Path) -> None:
    daemon = FakeDaemon(sock_path, mode="silent")
    cfg = config(tmp_path, sock_path, timeout_s=0.3, on_daemon_down="fail_closed")
    try:
        assert hook.run("prolog", SLURM_ENV, cfg, io.StringIO()) == 1
    finally:
        daemon.close()
    assert "no reply within 0.3s" in journal_lines(cfg)[0]["error"]


def test_garbled_reply_counts_as_unreachable(tmp_path: Path, sock_path: Path) -> None:
    daemon = FakeDaemon(sock_path, mode="garbage")
    cfg = config(tmp_path, sock_path)
    try:
        assert hook.run("prolog", SLURM_ENV, cfg, io.StringIO()) == 0
    finally:
        daemon.close()
    assert journal_lines(cfg)[0]["error"] == "reply is not JSON"


def test_repeated_journaling_appends_whole_lines(tmp_path: Path, sock_path: Path) -> None:
    cfg = config(tmp_path, sock_path)
    for op in ("prolog", "epilog", "epilog"):
        hook.run(op, SLURM_ENV, cfg, io.StringIO())
    entries = journal_lines(cfg)
    assert [e["op"] for e in entries] == ["prolog", "epilog", "epilog"]
    assert len({e["id"] for e in entries}) == 3


def test_unwritable_journal_fails_closed_even_in_fail_open(tmp_path: Path,
                                                           sock_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config(tmp_path, sock_path, journal=str(blocker / "journal.jsonl"))
    err = io.StringIO()
    assert hook.run("prolog", SLURM_ENV, cfg, err) == 1
    assert "not writable" in err.getvalue()


def test_missing_job_id_is_a_usage_error() -> None:
    with pytest.raises(hook.HookError, match="SLURM_JOB_ID is not set"):
        hook.build_request("prolog", {"SLURM_JOB_USER": "alice"})


def test_non_numeric_uid_is_a_usage_error() -> None:
    with pytest.raises(hook.HookError, match="SLURM_JOB_UID='x'"):
        hook.build_request("prolog", {**SLURM_ENV, "SLURM_JOB_UID": "x"})


def test_uuid_style_gpu_list_is_left_to_the_daemon() -> None:
    req = hook.build_request("prolog", {**SLURM_ENV, "SLURM_JOB_GPUS": "GPU-ab12,GPU-cd34"})
    assert "gpus" not in req


@pytest.mark.parametrize("content,message", [
    ("{", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"sockets": "/x"}', "unknown key 'sockets'"),
    ('{"timeout_s": 0}', "'timeout_s' must be"),
    ('{"on_daemon_down": "maybe"}', "'on_daemon_down' must be"),
    ('{"journal": ""}', "'journal' must be"),
])
def test_bad_config_names_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "hook.json"
    path.write_text(content)
    with pytest.raises(hook.HookError, match=message):
        hook.load_config(str(path))


def test_status_reports_health(tmp_path: Path, sock_path: Path) -> None:
    out = io.StringIO()
    assert hook.check_status(config(tmp_path, sock_path), out) == 1
    assert "not answering" in out.getvalue()
    daemon = FakeDaemon(sock_path)
    try:
        assert hook.check_status(config(tmp_path, sock_path), io.StringIO()) == 0
    finally:
        daemon.close()
    assert daemon.requests[0]["op"] == "status"


def _run_hook_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-S", str(HOOK_FILE), *args],
                          env=env, capture_output=True, text=True, timeout=30, check=False)


def test_hook_file_runs_without_site_packages(tmp_path: Path, sock_path: Path) -> None:
    cfg_path = tmp_path / "hook.json"
    cfg = config(tmp_path, sock_path, on_daemon_down="fail_closed")
    cfg_path.write_text(json.dumps(cfg))
    res = _run_hook_process(["prolog", "--config", str(cfg_path)], SLURM_ENV)
    assert res.returncode == 1, res.stderr
    assert "journaled" in res.stderr
    assert journal_lines(cfg)[0]["hook_exit"] == "fail_closed"


@pytest.mark.parametrize("args,message", [
    (["reboot"], "unknown operation 'reboot'"),
    (["prolog", "--bogus"], "unexpected argument '--bogus'"),
    (["prolog", "--config", "/nonexistent/hook.json"], "not found"),
])
def test_cli_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    res = _run_hook_process(args, SLURM_ENV)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_help_is_documented() -> None:
    res = _run_hook_process(["--help"], {})
    assert res.returncode == 0
    assert "prolog|epilog|status" in res.stdout and "Exit codes" in res.stdout


def test_hook_imports_only_the_standard_library() -> None:
    tree = ast.parse(HOOK_FILE.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names, "expected some imports"
    assert names <= set(sys.stdlib_module_names), names - set(sys.stdlib_module_names)


@pytest.mark.parametrize("value", [
    {"op": "prolog", "job_id": "1", "gpus": [0, 3], "uid": 0, "comment": "naïve \"q\"\n"},
    {"nested": {"a": [1, None, True, False, "x"]}},
])
def test_json_helpers_round_trip_like_the_json_module(value: dict[str, Any]) -> None:
    text = hook.dumps(value)
    assert json.loads(text) == value
    assert hook.loads(text) == value
    assert text == json.dumps(value, separators=(",", ":"), sort_keys=True)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "NaN", "[1,]"])
def test_json_helper_rejects_non_json(text: str) -> None:
    with pytest.raises(ValueError, match=r"not JSON|extra data"):
        hook.loads(text)
