"""The compiled table is valid Lua 5.1 and carries every string byte for byte."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from spark_slurm.policy import Policy, compile_lua
from spark_slurm.policy.lua import lua_string

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
