"""`sparkctl karman`: the Karman facility power stream (consume, replay, simulate, record)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from spark_slurm.karman.config import ToolConfig

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
DEFAULT_BIND = "tcp://127.0.0.1:5557"
DEFAULT_TOPIC = "cycle-aligned"
PHASE_MODES = ("streams-are-phases", "two-phase-per-stream")
SCENARIOS = ("no-cap", "static-300", "dynamic", "dynamic-mid")


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, so long-running commands stop cleanly."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


_count = click.option("--count", type=click.IntRange(min=1), default=None,
                      help="Stop after N cycles.")
_duration = click.option("--duration", type=click.FloatRange(min=0, min_open=True),
                         default=None, help="Stop after S seconds.")
_topic = click.option("--topic", default=None,
                      help=f"ZeroMQ topic (frame prefix). [default: the config's, else "
                           f"{DEFAULT_TOPIC}]")
_pub_topic = click.option("--topic", default=DEFAULT_TOPIC, show_default=True,
                          help="ZeroMQ topic (frame prefix).")
_endpoint = click.option("--endpoint", default=None,
                         help="Publisher to connect to (live device or replay). [default: "
                              f"the config's karman.source, else {DEFAULT_ENDPOINT}]")
_bind = click.option("--bind", default=DEFAULT_BIND, show_default=True,
                     help="Address to publish on (tcp://*:5557 for all interfaces).")
_wait = click.option("--wait-subscriber", type=click.FloatRange(min=0), default=0.0,
                     help="Wait up to S seconds for a subscriber before sending.")
_phases = click.option("--phases", type=click.Choice(PHASE_MODES), default=None,
                       help="How streams sum to rack power: streams-are-phases (the "
                            "reference: sum of phase_a) or two-phase-per-stream (phase_a + "
                            "phase_b). [default: the config's, else streams-are-phases]")
_config = click.option("--config", "config_path", default=None,
                       type=click.Path(path_type=Path, dir_okay=False),
                       help="Stream settings file (etc/karman.yaml: karman.source live|replay, "
                            "endpoints, topic, phases; exporter; recorder).")


def _tool_config(path: Path | None) -> ToolConfig | None:
    from spark_slurm.karman.config import load_tool_config  # noqa: PLC0415

    return None if path is None else load_tool_config(path)


@click.group()
def karman() -> None:
    """Karman facility power stream: tail, replay, simulate, synthesize, export, record."""


@karman.command()
@_endpoint
@_topic
@_phases
@_config
@_count
@_duration
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cycle.")
def tail(*, endpoint: str | None, topic: str | None, phases: str | None,
         config_path: Path | None, count: int | None, duration: float | None,
         as_json: bool) -> None:
    """Print each cycle of a Karman stream as it arrives, with the rack total."""
    from spark_slurm.karman.config import resolve_source  # noqa: PLC0415
    from spark_slurm.karman.schema import cycle_dict  # noqa: PLC0415
    from spark_slurm.karman.subscriber import iter_cycles  # noqa: PLC0415

    src = resolve_source(_tool_config(config_path), endpoint, topic, phases)
    assert src.endpoint is not None
    with _stop_on_signals() as stop:
        for cycle in iter_cycles(src.endpoint, src.topic, count=count, duration_s=duration,
                                 stop=stop):
            data = cycle_dict(cycle, src.phases)
            if as_json:
                click.echo(json.dumps(data, sort_keys=True), nl=True)
                continue
            parts = []
            for stream, s in zip(cycle.streams, data["streams"], strict=True):
                for phase, _ in stream.counted(src.phases):
                    r = s[phase]
                    parts.append(f"{s['name'].rsplit('/', 1)[-1]}.{phase[-1]} "
                                 f"{r.get('real_power_w', 0.0):7.1f} W "
                                 f"{r.get('voltage_rms', 0.0):5.1f} V "
                                 f"{r.get('current_rms', 0.0):5.2f} A")
            click.echo(f"{data['time_ns']} seq={data['seq']} total "
                       f"{data['real_power_w']:8.1f} W | " + " | ".join(parts))


@karman.command()
@click.argument("csv_path", metavar="CSV", type=click.Path(path_type=Path, dir_okay=False))
@_bind
@_pub_topic
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Messages per second (the reference replay's RATE_HZ).")
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Multiplies --rate (2 = twice as fast).")
@click.option("--streams", default="karman1,karman2,karman3", show_default=True,
              help="Stream names the CSV may hold, comma-separated (sent as threephase/NAME).")
@click.option("--loop", is_flag=True, help="Start over at the end, forever.")
@_count
@_duration
@_wait
def replay(*, csv_path: Path, bind: str, topic: str, rate: float, speed: float, streams: str,
           loop: bool, count: int | None, duration: float | None,
           wait_subscriber: float) -> None:
    """Publish a reference-layout CSV (.csv or gzip) as the reference replay does.

    One message per cycle at a fixed rate, stamped on that schedule; streams
    karman1..3 go out as threephase/karman1..3, and a phase_a-only stream is
    sent with phase_b = phase_a.
    """
    from spark_slurm.karman.publisher import replay_file  # noqa: PLC0415

    names = tuple(n.strip() for n in streams.split(",") if n.strip())
    if not names:
        raise click.BadParameter("give at least one stream name", param_hint="--streams")
    with _stop_on_signals() as stop:
        stats = replay_file(csv_path, bind, topic=topic, rate_hz=rate, speed=speed, loop=loop,
                            count=count, duration_s=duration, stop=stop,
                            wait_subscriber_s=wait_subscriber, streams=names)
    click.echo(f"sent {stats.sent} cycles ({stats.loops} full passes, "
               f"{stats.dropped} dropped)", err=True)


@karman.command("sim")
@click.option("--gpus", "gpus_dir", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="State directory of the simulated GPUs (`sparkctl sim init`).")
@_bind
@_pub_topic
@click.option("--rate", type=float, default=60.0, show_default=True, help="Cycles per second.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
@_count
@_duration
@_wait
def sim_stream(*, gpus_dir: Path, bind: str, topic: str, rate: float, seed: int,
               count: int | None, duration: float | None, wait_subscriber: float) -> None:
    """Publish a live rack stream whose power follows the simulated GPUs' draw."""
    from spark_slurm.karman.publisher import live_sim  # noqa: PLC0415

    with _stop_on_signals() as stop:
        stats = live_sim(gpus_dir, bind, topic=topic, rate_hz=rate, seed=seed, count=count,
                         duration_s=duration, stop=stop, wait_subscriber_s=wait_subscriber)
    click.echo(f"sent {stats.sent} cycles ({stats.dropped} dropped)", err=True)


@karman.command()
@click.argument("scenario", type=click.Choice(SCENARIOS))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="CSV to write (gzip'd when it ends in .gz).")
@click.option("--seed", type=int, default=None,
              help="Random seed (default: the scenario's, as in datasets/).")
@click.option("--seconds", type=float, default=None,
              help="Only the first S seconds. [default: the whole run]")
def synth(scenario: str, out: Path, seed: int | None, seconds: float | None) -> None:
    """Write a synthetic 8×B200 recording of a reference scenario (seeded, reproducible)."""
    from spark_slurm.karman.synth import write_scenario  # noqa: PLC0415

    rows = write_scenario(scenario, out, seconds=seconds, seed=seed)
    click.echo(f"wrote {rows} rows to {out}", err=True)


@karman.command()
@_endpoint
@_topic
@_phases
@_config
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="HTTP port for /metrics (0: any free port). [default: the config's, "
                   "else 9105 as the reference exporter]")
@click.option("--bind-address", default=None,
              help="Address the HTTP server listens on. [default: the config's, else "
                   "127.0.0.1]")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Messages each statistic covers. [default: the config's, else 300]")
@_duration
def exporter(*, endpoint: str | None, topic: str | None, phases: str | None,
             config_path: Path | None, port: int | None, bind_address: str | None,
             window: int | None, duration: float | None) -> None:
    """Serve the reference exporter's Prometheus metrics (and ours) for a Karman stream."""
    from spark_slurm.karman.config import resolve_source  # noqa: PLC0415
    from spark_slurm.karman.exporter import DEFAULT_PORT, WINDOW, Exporter  # noqa: PLC0415

    tool = _tool_config(config_path)
    src = resolve_source(tool, endpoint, topic, phases)
    assert src.endpoint is not None
    address = bind_address or (tool and tool.exporter_address) or "127.0.0.1"
    port = port if port is not None else (
        tool.exporter_port if tool and tool.exporter_port is not None else DEFAULT_PORT)
    window = window or (tool and tool.exporter_window) or WINDOW
    exp = Exporter(src.endpoint, src.topic, port=port, bind_address=address, window=window,
                   phases=src.phases)
    with _stop_on_signals() as stop:
        exp.start()
        click.echo(f"serving http://{address}:{exp.port}/metrics", err=True)
        try:
            stop.wait(duration)
        finally:
            exp.stop()


@karman.command()
@_endpoint
@_topic
@_phases
@_config
@click.option("--to", "to", default=None,
              help="SQLite file, or a postgresql:// URL (TimescaleDB when installed). "
                   "[default: the config's recorder.to]")
@click.option("--schema", type=click.Choice(["karman", "bibimbap"]), default=None,
              help="karman: our table, one row per stream and phase; bibimbap: the reference "
                   "sink's table, one JSON row per message. [default: the config's, else "
                   "karman]")
@_count
@_duration
def record(*, endpoint: str | None, topic: str | None, phases: str | None,
           config_path: Path | None, to: str | None, schema: str | None, count: int | None,
           duration: float | None) -> None:
    """Record every cycle of a Karman stream into a time-series table."""
    from spark_slurm.karman.config import resolve_source  # noqa: PLC0415
    from spark_slurm.karman.recorder import record_stream  # noqa: PLC0415

    tool = _tool_config(config_path)
    src = resolve_source(tool, endpoint, topic, phases)
    assert src.endpoint is not None
    target = to or (tool and tool.recorder_to)
    if not target:
        raise click.UsageError("give --to (or recorder.to in --config)")
    with _stop_on_signals() as stop:
        stats = record_stream(src.endpoint, target, topic=src.topic,
                              schema=schema or (tool and tool.recorder_schema) or "karman",
                              phases=src.phases, count=count, duration_s=duration, stop=stop,
                              batch=(tool and tool.recorder_batch) or 60)
    click.echo(f"recorded {stats.cycles} cycles ({stats.rows} rows)", err=True)
