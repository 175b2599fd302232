"""sparkd's configuration file: one YAML mapping, checked fully before anything starts.

A daemon that guesses at a half-valid config could govern GPUs wrongly, so every
problem is a `ConfigError` naming the file, line and column, and `sparkd` refuses
to start (exit 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spark_slurm.daemon.connections import ConnectionLimits
from spark_slurm.daemon.requests import executor_name_ok
from spark_slurm.errors import ConfigError
from spark_slurm.karman.config import parse_source

_KNOWN = {
    "node", "cluster", "socket", "state_dir", "ledger", "keys", "gpu", "policy", "karman",
    "metrics", "job_context", "slurm_user", "journal_path", "spool_path", "sampler",
    "automations", "max_request_bytes", "refusal_limit", "executors", "connections",
    "disk", "files", "recovery",
}


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """Validate-only mode (docs/executors.md): GPUs whose limits an external executor
    sets while sparkd only validates, and who may announce the executor's intents."""

    validate_all: bool = False
    validate_gpus: tuple[int, ...] = ()
    users: tuple[str, ...] = ()
    deadline_s: float = 30.0
    max_deadline_s: float = 600.0
    expect: str = "external"

    def validate_only(self, gpu: int) -> bool:
        """Whether sparkd must never set this GPU's limit (Slurm index)."""
        return self.validate_all or gpu in self.validate_gpus

    @property
    def enabled(self) -> bool:
        return self.validate_all or bool(self.validate_gpus)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything sparkd needs to run; paths are absolute after loading."""

    node: str
    state_dir: Path
    ledger_path: Path
    policy_path: Path
    socket_path: Path
    socket_mode: int = 0o666
    scheduler_socket: Path | None = None
    cluster: str = "spark"
    hmac_key: Path | None = None
    signing_key: Path | None = None
    gpu_backend: str = "sim"
    gpu_state_dir: Path | None = None
    gpu_gres_conf: Path | None = None  # Slurm index order (File=/MultipleFiles=); else minors
    gpu_persistence: str = "check"  # check: record and warn when off; enable: also turn on
    gpu_readback_tolerance_mw: int = 1000  # driver rounding accepted at read-back
    karman_endpoint: str | None = None
    karman_topic: str = "cycle-aligned"
    karman_phases: str = "streams-are-phases"  # karman.phases (spark_slurm/karman/config.py)
    karman_source: str | None = None  # live | replay when karman.source chose the endpoint
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0
    job_context_source: str = "static"
    job_context_options: dict[str, Any] = field(default_factory=dict)
    slurm_user: str | None = None
    journal_path: Path = Path("/var/lib/spark/journal.jsonl")
    spool_path: Path | None = None
    sampler_hz: float = 10.0
    sampler_seconds: float = 60.0
    monitor_period_s: float = 0.5
    maintain_period_s: float = 5.0
    ingest_period_s: float = 1.0
    checkpoint_interval_s: float = 900.0
    max_request_bytes: int = 65536
    refusal_rate_per_s: float = 1.0
    refusal_burst: int = 20
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    disk_min_free_bytes: int = 64 << 20
    journal_reserve_bytes: int = 1 << 20
    files_group: str | None = None
    resume_nodes: bool = False
    drain_reason_prefix: str = "spark:"
    executors: ExecutorSettings = field(default_factory=ExecutorSettings)


def _marks(text: str) -> dict[str, tuple[int, int]]:
    """Line/column (1-based) of each top-level key and nested `a.b` key."""
    out: dict[str, tuple[int, int]] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node: yaml.Node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            out[name] = (value.start_mark.line + 1, value.start_mark.column + 1)
            walk(value, name + ".")

    if root is not None:
        walk(root, "")
    return out


class _Reader:
    """Typed access to the parsed mapping that raises errors with a location."""

    def __init__(self, path: Path, data: dict[str, Any], marks: dict[str, tuple[int, int]]):
        self.path = path
        self.data = data
        self.marks = marks

    def fail(self, key: str, message: str) -> ConfigError:
        line, column = self.marks.get(key, (None, None))
        return ConfigError(f"{key}: {message}", str(self.path), line, column)

    def get(self, key: str) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict):
                return None
            node = node.get(part)
        return node

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"{value} is outside {low}..{high}")
        return float(value)

    def whole(self, key: str, default: int, low: int, high: int,
              what: str = "a whole number") -> int:
        value = self.number(key, default, low, high)
        if value != int(value):
            raise self.fail(key, f"{value} is not {what}")
        return int(value)

    def path_(self, key: str, default: Path | None = None) -> Path | None:
        value = self.text(key)
        if value is None:
            return default
        p = Path(value)
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def section(self, key: str) -> dict[str, Any]:
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value


def _mode(reader: _Reader) -> int:
    value = reader.get("socket.mode")
    if value is None:
        return 0o666
    if isinstance(value, bool):
        raise reader.fail("socket.mode", f"expected an octal mode like \"0660\", got {value!r}")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            raise reader.fail("socket.mode", f"{value!r} is not an octal mode") from None
    else:
        raise reader.fail("socket.mode", f"expected an octal mode, got {value!r}")
    if not 0 <= mode <= 0o777:
        raise reader.fail("socket.mode", f"{oct(mode)} is not a permission mode")
    return mode


def parse_config(text: str, path: Path) -> DaemonConfig:
    """Check and convert the YAML text of a sparkd config; relative paths follow the file."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}", str(path), line, column) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a YAML mapping at the top level", str(path), 1, 1)
    reader = _Reader(path, data, _marks(text))
    for key in data:
        if key not in _KNOWN:
            raise reader.fail(str(key), f"unknown key (known: {', '.join(sorted(_KNOWN))})")
    for key in ("socket", "keys", "gpu", "karman", "metrics", "job_context", "sampler",
                "automations", "refusal_limit", "executors", "connections", "disk",
                "files", "recovery"):
        reader.section(key)

    state_dir = reader.path_("state_dir", Path("/var/lib/spark"))
    assert state_dir is not None
    node = reader.text("node") or os.uname().nodename.split(".")[0]
    backend = reader.text("gpu.backend", "sim") or "sim"
    if backend not in ("sim", "nvml", "none"):
        raise reader.fail("gpu.backend", f"unknown backend {backend!r} (sim, nvml, or none "
                          "for a host without GPUs)")
    gpu_state = reader.path_("gpu.state_dir")
    if backend == "sim" and gpu_state is None:
        raise reader.fail("gpu", "the sim backend needs gpu.state_dir "
                          "(made by `sparkctl sim init`)")
    persistence = reader.text("gpu.persistence", "check") or "check"
    if persistence not in ("check", "enable"):
        raise reader.fail("gpu.persistence", f"expected check or enable, got {persistence!r}")
    policy = reader.path_("policy")
    if policy is None:
        raise ConfigError("policy: missing (path of the site policy YAML)", str(path), 1, 1)
    source_section = reader.section("job_context")
    source = reader.text("job_context.source", "static") or "static"
    if source not in ("static", "scontrol", "pyslurm", "auto"):
        raise reader.fail("job_context.source", f"unknown source {source!r} "
                          "(static, scontrol, pyslurm or auto)")
    options = {k: v for k, v in source_section.items() if k != "source"}
    if isinstance(options.get("path"), str) and not Path(options["path"]).is_absolute():
        options["path"] = str((path.parent / options["path"]).resolve())
    port = reader.whole("metrics.port", 0, 0, 65535, "a port number")
    karman = parse_source(reader.section("karman") if "karman" in data else None,
                          lambda key, why: reader.fail(f"karman.{key}", why))
    return DaemonConfig(
        node=node,
        cluster=reader.text("cluster", "spark") or "spark",
        state_dir=state_dir,
        ledger_path=reader.path_("ledger", state_dir / "ledger.db") or state_dir / "ledger.db",
        policy_path=policy,
        socket_path=reader.path_("socket.path", Path("/run/spark/sparkd.sock"))
        or Path("/run/spark/sparkd.sock"),
        socket_mode=_mode(reader),
        scheduler_socket=_scheduler_socket(reader),
        hmac_key=reader.path_("keys.hmac"),
        signing_key=reader.path_("keys.signing"),
        gpu_backend=backend,
        gpu_state_dir=gpu_state,
        gpu_gres_conf=reader.path_("gpu.gres_conf"),
        gpu_persistence=persistence,
        gpu_readback_tolerance_mw=reader.whole("gpu.readback_tolerance_mw", 1000, 0, 50_000),
        karman_endpoint=karman.endpoint,
        karman_topic=karman.topic,
        karman_phases=karman.phases,
        karman_source=karman.source,
        metrics_address=reader.text("metrics.address", "127.0.0.1") or "127.0.0.1",
        metrics_port=port,
        job_context_source=source,
        job_context_options=options,
        slurm_user=reader.text("slurm_user"),
        journal_path=reader.path_("journal_path", state_dir / "journal.jsonl")
        or state_dir / "journal.jsonl",
        spool_path=reader.path_("spool_path"),
        sampler_hz=reader.number("sampler.rate_hz", 10.0, 0.5, 100.0),
        sampler_seconds=reader.number("sampler.seconds", 60.0, 5.0, 3600.0),
        monitor_period_s=reader.number("automations.period_s", 0.5, 0.05, 1.0),
        maintain_period_s=reader.number("automations.maintain_period_s", 5.0, 0.5, 3600.0),
        ingest_period_s=reader.number("automations.ingest_period_s", 1.0, 0.2, 3600.0),
        checkpoint_interval_s=reader.number("automations.checkpoint_interval_s", 900.0, 1.0,
                                            86400.0),
        max_request_bytes=int(reader.number("max_request_bytes", 65536, 256, 1 << 24)),
        refusal_rate_per_s=reader.number("refusal_limit.rate_per_s", 1.0, 0.0, 1000.0),
        refusal_burst=reader.whole("refusal_limit.burst", 20, 0, 100_000),
        connections=_connections(reader),
        disk_min_free_bytes=reader.whole("disk.min_free_mb", 64, 0, 1 << 30) << 20,
        journal_reserve_bytes=reader.whole("disk.reserve_kb", 1024, 16, 1 << 20) << 10,
        files_group=reader.text("files.group"),
        resume_nodes=_resume(reader, source),
        drain_reason_prefix=reader.text("recovery.reason_prefix", "spark:") or "spark:",
        executors=_executors(reader),
    )


def _connections(reader: _Reader) -> ConnectionLimits:
    """The `connections` section: slots, the scheduler's reserve, per-uid quota and rate."""
    for key in reader.section("connections"):
        if key not in ("max", "reserved", "per_uid", "rate_per_s", "burst", "idle_timeout_s",
                       "refuse_per_s"):
            raise reader.fail(f"connections.{key}", "unknown key (known: max, reserved, "
                              "per_uid, rate_per_s, burst, idle_timeout_s, refuse_per_s)")
    limits = ConnectionLimits(
        max_connections=reader.whole("connections.max", 256, 2, 100_000),
        reserved=reader.whole("connections.reserved", 32, 1, 100_000),
        per_uid=reader.whole("connections.per_uid", 8, 1, 100_000),
        rate_per_s=reader.number("connections.rate_per_s", 20.0, 0.0, 100_000.0),
        burst=reader.whole("connections.burst", 40, 0, 1_000_000),
        idle_timeout_s=reader.number("connections.idle_timeout_s", 10.0, 0.5, 3600.0),
        refuse_per_s=reader.number("connections.refuse_per_s", 2000.0, 0.0, 1e7))
    if limits.reserved >= limits.max_connections:
        raise reader.fail("connections.reserved", f"{limits.reserved} leaves no slot of "
                          f"connections.max ({limits.max_connections}) for users")
    return limits


def _scheduler_socket(reader: _Reader) -> Path | None:
    """socket.scheduler_path: root's and the SlurmUser's own socket (0600), beside the
    public one unless named; `false` turns it off."""
    if reader.get("socket.scheduler_path") is False:
        return None
    named = reader.path_("socket.scheduler_path")
    if named is not None:
        return named
    public = reader.path_("socket.path", Path("/run/spark/sparkd.sock"))
    assert public is not None
    return public.with_name("sparkd-scheduler.sock")


def _resume(reader: _Reader, source: str) -> bool:
    """recovery.resume_nodes: true, false, or auto (on wherever Slurm is the job source)."""
    value = reader.get("recovery.resume_nodes")
    if value is None or value == "auto":
        return source != "static"
    if not isinstance(value, bool):
        raise reader.fail("recovery.resume_nodes", f"expected true, false or auto, got "
                          f"{value!r}")
    return value


_EXECUTOR_KEYS = {"validate_only", "users", "deadline_s", "max_deadline_s", "expect"}


def _executors(reader: _Reader) -> ExecutorSettings:
    section = reader.section("executors")
    for key in section:
        if key not in _EXECUTOR_KEYS:
            raise reader.fail(f"executors.{key}", "unknown key (known: "
                              f"{', '.join(sorted(_EXECUTOR_KEYS))})")
    value = section.get("validate_only")
    validate_all, gpus = False, ()
    if value == "all":
        validate_all = True
    elif isinstance(value, list):
        if any(isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 4096
               for g in value) or len(set(value)) != len(value):
            raise reader.fail("executors.validate_only",
                              "expected \"all\" or a list of distinct GPU indices")
        gpus = tuple(sorted(value))
    elif value not in (None, False, "none"):
        raise reader.fail("executors.validate_only",
                          f"expected \"all\", \"none\" or a list of GPU indices, got {value!r}")
    users = section.get("users") or []
    if not isinstance(users, list) or any(
            isinstance(u, bool) or not isinstance(u, (str, int)) or not str(u).strip()
            for u in users):
        raise reader.fail("executors.users", "expected a list of user names or uids")
    deadline = reader.number("executors.deadline_s", 30.0, 0.5, 86400.0)
    longest = reader.number("executors.max_deadline_s", max(600.0, deadline), 0.5, 86400.0)
    if longest < deadline:
        raise reader.fail("executors.max_deadline_s",
                          f"{longest:g} is shorter than executors.deadline_s {deadline:g}")
    expect = reader.text("executors.expect", "external") or "external"
    if not executor_name_ok(expect):
        raise reader.fail("executors.expect", f"{expect!r} is not an executor name "
                          "(1-64 of letters, digits, '.', '_', '-')")
    return ExecutorSettings(validate_all=validate_all, validate_gpus=gpus,
                            users=tuple(str(u) for u in users), deadline_s=deadline,
                            max_deadline_s=longest, expect=expect)


def load_config(path: Path) -> DaemonConfig:
    """Read and check a sparkd config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", str(path)) from None
    return parse_config(text, path)
