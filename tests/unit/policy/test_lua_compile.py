"""The compiled table is valid Lua 5.1 and carries every string byte for byte."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_slurm.errors import InputError
from spark_slurm.policy import Policy, compile_lua
from spark_slurm.policy.lua import lua_string, write_lua

EXAMPLE = Path(__file__).resolve().parents[3] / "etc" / "policy.yaml"

POLICY = """
rules:
  - id: odd-reason
    match: {account: [a, b.c], partition: p-1}
    action: deny
    reason: "say \\"no\\" \\\\ to caf\u00e9 \u2014 100% ]]\\n[[ -- not a comment"
tenants:
  t_1: {max_node_watts: 3000, max_gpus: 8}
"""


@pytest.mark.parametrize("lua", ["lua5.1", "lua5.3", "lua5.4"])
def test_strings_round_trip_through_lua(tmp_path: Path, lua: str) -> None:
    if shutil.which(lua) is None:
        pytest.skip(f"{lua} not installed")
    pol = Policy.from_text(POLICY)
    path = tmp_path / "p.lua"
    path.write_text(compile_lua(pol, spool="/tmp/sp\u00e4ce dir/d.jsonl"))
    probe = (f"local p = dofile({lua_string(str(path))}); local r = p.rules[1]; "
             "io.write(r.reason, '\\0', r.match.account[2], '\\0', r.match.partition[1], '\\0', "
             "p.spool, '\\0', p.tenants.t_1.max_node_watts, '\\0', tostring(p.node_max_watts))")
    out = subprocess.run([lua, "-e", probe], capture_output=True, check=True).stdout
    reason, account, partition, spool, node_max, site_node = out.decode("utf-8").split("\0")
    assert reason == pol.data.rules[0].reason
    assert "\u2014 100% ]]\n[[" in reason
    assert (account, partition) == ("b.c", "p-1")
    assert spool == "/tmp/sp\u00e4ce dir/d.jsonl"
    assert (node_max, site_node) == ("3000", "nil")


def test_compiled_chunk_is_ascii_and_names_its_source() -> None:
    pol = Policy.from_text(POLICY, source="/etc/spark/policy.yaml")
    chunk = compile_lua(pol)
    chunk.encode("ascii")
    assert chunk.startswith("-- spark-slurm admission policy, compiled from /etc/spark/policy.yaml")
    assert 'fail_mode = "closed"' in chunk
    assert 'spool = "/var/spool/spark/denials.jsonl"' in chunk


def test_the_header_names_any_source_path_on_one_comment_line() -> None:
    # Printable ASCII (space and '~' are its ends) is kept; anything else, a newline
    # that would end the comment and leave the path as Lua code, becomes one '?'.
    pol = Policy.from_text(POLICY, source="/srv/spark ~ops/caf\u00e9\npolicy.yaml")
    lines = compile_lua(pol).splitlines()
    assert lines[0] == ("-- spark-slurm admission policy, compiled from "
                        "/srv/spark ~ops/caf??policy.yaml")
    assert lines[1].startswith("-- by `sparkctl policy compile`")
    assert lines[2] == "return {"


def test_written_table_is_readable_by_slurmctld_and_writable_by_root_only(tmp_path: Path) -> None:
    # mkstemp makes 0600; slurmctld runs as SlurmUser and must read it, nobody else write it.
    out = tmp_path / "spark_policy.lua"
    write_lua(EXAMPLE, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert out.read_text("ascii") == compile_lua(Policy.load(EXAMPLE))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spark_policy.lua"]


def test_a_failed_write_says_why_and_leaves_no_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "spark_policy.lua"
    out.mkdir()  # the rename onto it fails after the temp file is written
    with pytest.raises(InputError) as caught:
        write_lua(EXAMPLE, out)
    assert str(caught.value) == f"{out}: cannot write compiled policy: Is a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["spark_policy.lua"]
    assert list(out.iterdir()) == []


@pytest.fixture
def other_filesystem() -> Iterator[Path]:
    """A directory on another filesystem than the temp dir (a tmpfs /tmp, NFS /etc/slurm)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("no filesystem other than the temp dir's to write to")
    where = Path(tempfile.mkdtemp(dir=shm))
    try:
        yield where
    finally:
        shutil.rmtree(where)


def test_compiles_into_a_directory_on_another_filesystem(other_filesystem: Path) -> None:
    # The temp file must be made beside the target: os.replace cannot cross filesystems.
    out = other_filesystem / "spark_policy.lua"
    write_lua(EXAMPLE, out)
    assert out.read_text("ascii") == compile_lua(Policy.load(EXAMPLE))
