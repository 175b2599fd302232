"""The `karman:` settings: one live/replay switch and the phase semantics, in both files."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_slurm.daemon.config import load_config, parse_config
from spark_slurm.errors import ConfigError
from spark_slurm.karman.config import load_tool_config, resolve_source

ROOT = Path(__file__).resolve().parents[3]
BASE = "policy: p.yaml\ngpu: {backend: sim, state_dir: s}\n"

def test_the_switch_picks_the_endpoint() -> None:
    live = parse_config(BASE + "karman:\n  source: live\n  live_endpoint: tcp://pdu:5557\n"
                        "  replay_endpoint: tcp://127.0.0.1:6000\n", Path("/x/s.yaml"))
    assert (live.karman_endpoint, live.karman_source) == ("tcp://pdu:5557", "live")
    replay = parse_config(BASE + "karman:\n  source: replay\n  live_endpoint: tcp://pdu:5557\n"
                          "  replay_endpoint: tcp://127.0.0.1:6000\n", Path("/x/s.yaml"))
    assert (replay.karman_endpoint, replay.karman_source) == ("tcp://127.0.0.1:6000", "replay")
    default = parse_config(BASE + "karman: {source: replay}\n", Path("/x/s.yaml"))
    assert default.karman_endpoint == "tcp://127.0.0.1:5557"
    assert default.karman_phases == "streams-are-phases"
    legacy = parse_config(BASE + "karman: {endpoint: 'tcp://h:1', topic: '',"
                          " phases: two-phase-per-stream}\n", Path("/x/s.yaml"))
    assert (legacy.karman_endpoint, legacy.karman_topic, legacy.karman_phases) == (
        "tcp://h:1", "", "two-phase-per-stream")
    none = parse_config(BASE, Path("/x/s.yaml"))
    assert none.karman_endpoint is None

@pytest.mark.parametrize(("karman", "message"), [
    ("karman: {source: live}\n", "s.yaml:3:18: karman.source: live needs live_endpoint"),
    ("karman: {source: device}\n", "s.yaml:3:18: karman.source: unknown source 'device'"),
    ("karman: {source: live, live_endpoint: 'tcp://a:1', endpoint: 'tcp://b:2'}\n",
     "karman.endpoint: give either endpoint or source"),
    ("karman: {phases: all-six}\n", "s.yaml:3:18: karman.phases: unknown phase semantics"),
    ("karman: {topik: x}\n", "s.yaml:3:17: karman.topik: unknown key"),
    ("karman: {topic: 5}\n", "karman.topic: expected a string"),
])
def test_bad_karman_settings_name_file_line_column(karman: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + karman, Path("/x/s.yaml"))
    assert message in str(err.value)

def test_shipped_examples_parse_and_agree() -> None:
    node = load_config(ROOT / "etc" / "sparkd.yaml")
    tools = load_tool_config(ROOT / "etc" / "karman.yaml")
    assert node.karman_source == "live" and node.karman_endpoint.endswith(":5557")  # type: ignore[union-attr]
    assert tools.source.source == "replay"
    assert tools.source.endpoint == "tcp://127.0.0.1:5557"
    assert node.karman_phases == tools.source.phases == "streams-are-phases"
    assert node.karman_topic == tools.source.topic == "cycle-aligned"
    assert (tools.exporter_port, tools.exporter_window) == (9105, 300)
    assert tools.recorder_schema == "bibimbap"

def test_command_line_over_file_over_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "k.yaml"
    conf.write_text("karman: {source: live, live_endpoint: 'tcp://pdu:5557', topic: t}\n")
    tool = load_tool_config(conf)
    assert resolve_source(tool).endpoint == "tcp://pdu:5557"
    got = resolve_source(tool, "tcp://other:1", None, "two-phase-per-stream")
    assert (got.endpoint, got.topic, got.phases) == ("tcp://other:1", "t",
                                                    "two-phase-per-stream")
    bare = resolve_source(None)
    assert (bare.endpoint, bare.topic, bare.phases) == (
        "tcp://127.0.0.1:5557", "cycle-aligned", "streams-are-phases")
    conf.write_text("")
    assert load_tool_config(conf).source.endpoint is None
    conf.write_text("recorder: {schema: timescale}\n")
    with pytest.raises(ConfigError, match=r"k.yaml:1:20: recorder.schema: unknown schema"):
        load_tool_config(conf)
    conf.write_text("exporter: {port: 99999}\n")
    with pytest.raises(ConfigError, match=r"exporter.port: 99999 is outside 0..65535"):
        load_tool_config(conf)
    conf.write_text("nope: 1\n")
    with pytest.raises(ConfigError, match=r"1:7: nope: unknown key"):
        load_tool_config(conf)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_tool_config(tmp_path / "absent.yaml")
