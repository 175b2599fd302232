"""Runs the real slurm/job_submit.lua under a real Lua interpreter with a mock `slurm` table.

The plugin and a compiled policy are installed into a temp "slurm.conf directory"
exactly as an admin would, then a small Lua driver loads the plugin, calls its
entry points with job_desc tables shaped like slurmctld's (slurm-facts.md), and
prints what came back as JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spark_slurm.policy import Policy, compile_lua
from spark_slurm.policy.lua import lua_string

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = ROOT / "slurm" / "job_submit.lua"
EXAMPLE_POLICY = ROOT / "etc" / "policy.yaml"
INTERPRETERS = ("lua5.1", "lua5.3", "lua5.4")

DRIVER = r"""
local captured = { user = {}, info = {}, error = {} }
local function keep(kind) return function(fmt, ...)
  table.insert(captured[kind], string.format(fmt, ...)) end end
slurm = { SUCCESS = 0, ERROR = -1, NO_VAL = 4294967294, NO_VAL16 = 65534,
  log_user = keep("user"), log_info = keep("info"), log_error = keep("error") }
%(prelude)s
dofile(%(plugin)s)

local function encode(v)
  local t = type(v)
  if t == "nil" then return "null" end
  if t == "number" then return string.format("%%.0f", v) end
  if t == "boolean" then return tostring(v) end
  if t == "string" then
    return '"' .. string.gsub(v, '[%%c"\\\128-\255]', function(c)
      return string.format("\\u%%04x", string.byte(c)) end) .. '"'
  end
  local parts, is_list = {}, #v > 0
  if is_list then
    for _, x in ipairs(v) do parts[#parts + 1] = encode(x) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  for k, x in pairs(v) do parts[#parts + 1] = encode(tostring(k)) .. ":" .. encode(x) end
  return "{" .. table.concat(parts, ",") .. "}"
end

local loaded = { user = captured.user, info = captured.info, error = captured.error }
local out = {}
for i, case in ipairs(%(cases)s) do
  captured.user, captured.info, captured.error = {}, {}, {}
  local rc
  if case.modify then
    rc = slurm_job_modify(case.job_desc, case.job_rec, case.part_list, case.uid)
  else
    rc = slurm_job_submit(case.job_desc, case.part_list, case.uid)
  end
  out[i] = { rc = rc, job_desc = case.job_desc, user = captured.user,
             info = captured.info, error = captured.error }
end
print(encode({ load = loaded, results = out }))
"""


class RawLua(str):
    """Lua source to splice in verbatim (e.g. a string with bytes that are not UTF-8)."""


def to_lua(value: Any) -> str:
    """A Python value as a Lua literal (None fields are simply absent, as in slurmctld)."""
    if isinstance(value, RawLua):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, dict):
        items = [f"[{lua_string(k)}] = {to_lua(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, list):
        return "{ " + ", ".join(to_lua(v) for v in value) + " }"
    raise TypeError(type(value))


@dataclass
class Outcome:
    rc: int
    job_desc: dict[str, Any]
    user: list[str]
    info: list[str]
    error: list[str]

    @property
    def token(self) -> dict[str, str]:
        text = str(self.job_desc.get("admin_comment", ""))
        spark = next(w for w in text.split() if w.startswith("spark:"))
        return dict(kv.split("=", 1) for kv in spark[len("spark:"):].split(","))


@dataclass
class LuaPlugin:
    """One installed plugin + policy in a temp dir, run by one interpreter."""

    lua: str
    etc: Path
    spool: Path
    prelude: str = ""
    load_log: dict[str, list[str]] = field(default_factory=dict)

    def install(self, policy_text: str | None = None, raw_lua: str | None = None) -> None:
        shutil.copy(PLUGIN, self.etc / "job_submit.lua")
        target = self.etc / "spark_policy.lua"
        if raw_lua is not None:
            target.write_text(raw_lua)
        elif policy_text is not None:
            target.write_text(compile_lua(Policy.from_text(policy_text), str(self.spool)))
        elif target.exists():
            target.unlink()

    def run(self, cases: list[dict[str, Any]]) -> list[Outcome]:
        for case in cases:
            case.setdefault("uid", 1000)
            case.setdefault("part_list", {})
        script = DRIVER % {"prelude": self.prelude,
                           "plugin": lua_string(str(self.etc / "job_submit.lua")),
                           "cases": to_lua(cases)}
        proc = subprocess.run([self.lua, "-"], input=script, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        self.load_log = data["load"]
        return [Outcome(r["rc"], r["job_desc"] if isinstance(r["job_desc"], dict) else {},
                        r.get("user") or [], r.get("info") or [], r.get("error") or [])
                for r in data["results"]]

    def submit(self, uid: int = 1000, part_list: dict[str, Any] | None = None,
               **job_desc: Any) -> Outcome:
        job_desc.setdefault("user_name", "alice")
        job_desc.setdefault("name", "job")
        return self.run([{"job_desc": job_desc, "uid": uid, "part_list": part_list or {}}])[0]

    def modify(self, job_desc: dict[str, Any], job_rec: dict[str, Any],
               uid: int = 1000) -> Outcome:
        return self.run([{"modify": True, "job_desc": job_desc, "job_rec": job_rec,
                          "uid": uid}])[0]

    def spool_lines(self) -> list[dict[str, Any]]:
        if not self.spool.exists():
            return []
        return [json.loads(line) for line in self.spool.read_text("utf-8").splitlines()]


def _interpreters() -> Iterator[Any]:
    for name in INTERPRETERS:
        marks = [] if shutil.which(name) else [pytest.mark.skip(reason=f"{name} not installed")]
        yield pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=list(_interpreters()))
def plugin(request: pytest.FixtureRequest, tmp_path: Path) -> LuaPlugin:
    """The plugin with etc/policy.yaml compiled next to it, spool in tmp_path."""
    etc = tmp_path / "etc"
    etc.mkdir()
    p = LuaPlugin(lua=str(request.param), etc=etc, spool=tmp_path / "spool" / "denials.jsonl")
    p.spool.parent.mkdir()
    p.install(EXAMPLE_POLICY.read_text())
    return p
