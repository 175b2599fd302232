"""spark-hook reads its environment without importing `os`, exactly as os.environ would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spark_slurm import hook

PKG = str(Path(hook.__file__).resolve().parents[1])
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from spark_slurm import hook
before = "os" in sys.modules
env = dict(hook.environ())
import os
print(repr((before, env == dict(os.environ), sorted(env) == sorted(os.environ))))
"""


def test_environ_without_os_matches_os_environ() -> None:
    env = {"SLURM_JOB_ID": "7", "SPARK_X": "naïve ✓", "PATH": "/usr/bin:/bin"}
    env_bytes = {k.encode(): v.encode() for k, v in env.items()}
    env_bytes[b"SPARK_BAD"] = b"\xff\xfe not utf-8"  # surrogateescape, as os.environ does
    res = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, PKG], env=env_bytes,
                         capture_output=True, text=True, check=True, timeout=30)
    assert res.stdout.strip() == "(False, True, True)", res.stderr


def test_environ_is_the_live_os_environ_once_os_is_imported() -> None:
    assert hook.environ() is os.environ


def test_the_hook_start_path_does_not_import_os(tmp_path: Path) -> None:
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from spark_slurm import hook; "
             "cfg = hook.load_config(sys.argv[2]); "
             "req = hook.build_request('prolog', hook.environ()); "
             "print('os' in sys.modules, req['job_id'])")
    cfg = tmp_path / "hook.json"
    cfg.write_text(json.dumps({"socket": str(tmp_path / "s.sock")}))
    res = subprocess.run([sys.executable, "-I", "-S", "-c", probe, PKG, str(cfg)],
                         env={"SLURM_JOB_ID": "12"}, capture_output=True, text=True,
                         check=True, timeout=30)
    assert res.stdout.split() == ["False", "12"], res.stderr


def test_journal_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "journal.jsonl"
    hook.journal(str(path), {"op": "prolog", "job_id": "1"}, "fail_open", "down", 5)
    entry = json.loads(path.read_text())
    assert entry == {"op": "prolog", "job_id": "1", "journaled_ns": 5,
                     "hook_exit": "fail_open", "error": "down"}
    assert (path.parent.stat().st_mode & 0o777) == 0o700
