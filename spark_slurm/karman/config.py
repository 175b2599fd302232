"""Where a Karman stream comes from and how it is read: the `karman:` settings.

One shape of section serves sparkd (`etc/sparkd.yaml`) and the exporter and
recorder (`etc/karman.yaml`), so one switch moves every consumer between the
live device and a replay, as the reference chart's `source.mode` does:

    karman:
      source: replay                    # live | replay
      live_endpoint: tcp://DEVICE:5557  # the Karman device (its publisher binds 5557)
      replay_endpoint: tcp://127.0.0.1:5557
      topic: cycle-aligned
      phases: streams-are-phases        # or two-phase-per-stream

`endpoint:` (one fixed address) is still accepted instead of `source:`.
`etc/karman.yaml` adds `exporter:` and `recorder:` sections. Every problem is a
ConfigError naming the file, line and column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_slurm.errors import ConfigError
from spark_slurm.karman.schema import DEFAULT_PHASES, DEFAULT_TOPIC, PHASE_MODES

SOURCES = ("live", "replay")
DEFAULT_REPLAY_ENDPOINT = "tcp://127.0.0.1:5557"
_SOURCE_KEYS = ("source", "live_endpoint", "replay_endpoint", "endpoint", "topic", "phases")
_EXPORTER_KEYS = ("address", "port", "window")
_RECORDER_KEYS = ("to", "schema", "batch")


@dataclass(frozen=True, slots=True)
class KarmanSource:
    """The resolved stream: `endpoint` None means no stream is configured."""

    endpoint: str | None = None
    topic: str = DEFAULT_TOPIC
    phases: str = DEFAULT_PHASES
    source: str | None = None  # live | replay, when chosen by the switch


def parse_source(section: Mapping[str, Any] | None,
                 fail: Callable[[str, str], ConfigError]) -> KarmanSource:
    """Check a `karman:` section; `fail(key, why)` builds the error for `karman.<key>`."""
    if section is None:
        return KarmanSource()
    _known_or_fail(section, _SOURCE_KEYS, fail)
    get = section.get

    def text(key: str) -> str | None:
        value = get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail(key, f"expected a non-empty string, got {value!r}")
        return value.strip()

    phases = text("phases") or DEFAULT_PHASES
    if phases not in PHASE_MODES:
        raise fail("phases", f"unknown phase semantics {phases!r} "
                   f"(choose {' or '.join(PHASE_MODES)})")
    topic = get("topic")
    if topic is not None and not isinstance(topic, str):
        raise fail("topic", f"expected a string (\"\" for no topic), got {topic!r}")
    source = text("source")
    fixed = text("endpoint")
    if source is None:
        return KarmanSource(fixed, DEFAULT_TOPIC if topic is None else topic, phases)
    if source not in SOURCES:
        raise fail("source", f"unknown source {source!r} (live or replay)")
    if fixed is not None:
        raise fail("endpoint", "give either endpoint or source (live/replay), not both")
    if source == "live":
        endpoint = text("live_endpoint")
        if endpoint is None:
            raise fail("source", "live needs live_endpoint "
                       "(the Karman device, e.g. tcp://DEVICE:5557)")
    else:
        endpoint = text("replay_endpoint") or DEFAULT_REPLAY_ENDPOINT
    return KarmanSource(endpoint, DEFAULT_TOPIC if topic is None else topic, phases, source)


def _known_or_fail(section: Mapping[str, Any], known: tuple[str, ...],
                   fail: Callable[[str, str], ConfigError]) -> None:
    for key in section:
        if key not in known:
            raise fail(str(key), f"unknown key (known: {', '.join(known)})")


@dataclass(frozen=True, slots=True)
class ToolConfig:
    """etc/karman.yaml: the stream, and the exporter's and recorder's settings.

    Fields left out of the file are None, so command-line options and built-in
    defaults fill them.
    """

    source: KarmanSource
    exporter_address: str | None = None
    exporter_port: int | None = None
    exporter_window: int | None = None
    recorder_to: str | None = None
    recorder_schema: str | None = None
    recorder_batch: int | None = None


def load_tool_config(path: Path) -> ToolConfig:
    """Read and check an exporter/recorder config file (etc/karman.yaml)."""
    import yaml  # noqa: PLC0415 - only config users pay for it

    from spark_slurm.daemon.config import _marks, _Reader  # noqa: PLC0415 - same file rules

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}", str(path),
                          mark.line + 1 if mark else None,
                          mark.column + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("expected a YAML mapping at the top level", str(path), 1, 1)
    reader = _Reader(path, data, _marks(text))
    _known_or_fail(data, ("karman", "exporter", "recorder"), reader.fail)
    for name, keys in (("exporter", _EXPORTER_KEYS), ("recorder", _RECORDER_KEYS)):
        def fail(key: str, why: str, section: str = name) -> ConfigError:
            return reader.fail(f"{section}.{key}", why)

        _known_or_fail(reader.section(name), keys, fail)
    source = parse_source(reader.section("karman") if "karman" in data else None,
                          lambda k, why: reader.fail(f"karman.{k}", why))
    schema = reader.text("recorder.schema")
    if schema is not None and schema not in ("karman", "bibimbap"):
        raise reader.fail("recorder.schema", f"unknown schema {schema!r} (karman or bibimbap)")

    def whole(key: str, low: int, high: int) -> int | None:
        return None if reader.get(key) is None else reader.whole(key, 0, low, high)

    return ToolConfig(
        source=source,
        exporter_address=reader.text("exporter.address"),
        exporter_port=whole("exporter.port", 0, 65535),
        exporter_window=whole("exporter.window", 1, 1_000_000),
        recorder_to=reader.text("recorder.to"),
        recorder_schema=schema,
        recorder_batch=whole("recorder.batch", 1, 1_000_000),
    )


def resolve_source(tool: ToolConfig | None, endpoint: str | None = None,
                   topic: str | None = None, phases: str | None = None) -> KarmanSource:
    """Command-line options over the config file over the built-in defaults."""
    base = tool.source if tool is not None else KarmanSource()
    return KarmanSource(
        endpoint=endpoint or base.endpoint or DEFAULT_REPLAY_ENDPOINT,
        topic=base.topic if topic is None else topic,
        phases=phases or base.phases,
        source=None if endpoint else base.source)
