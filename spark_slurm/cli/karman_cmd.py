"""`sparkctl karman`: the Karman facility power stream (consume, replay, simulate, record)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
DEFAULT_BIND = "tcp://127.0.0.1:5557"
DEFAULT_TOPIC = "cycle-aligned"


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
_topic = click.option("--topic", default=DEFAULT_TOPIC, show_default=True,
                      help="ZeroMQ topic (frame prefix).")
_endpoint = click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True,
                         help="Publisher to connect to (live device or replay).")
_bind = click.option("--bind", default=DEFAULT_BIND, show_default=True,
                     help="Address to publish on (tcp://*:5557 for all interfaces).")
_wait = click.option("--wait-subscriber", type=click.FloatRange(min=0), default=0.0,
                     help="Wait up to S seconds for a subscriber before sending.")


@click.group()
def karman() -> None:
    """Karman facility power stream: tail, replay, simulate, synthesize, export, record."""


@karman.command()
@_endpoint
@_topic
@_count
@_duration
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cycle.")
def tail(endpoint: str, topic: str, count: int | None, duration: float | None,
         as_json: bool) -> None:
    """Print each cycle of a Karman stream as it arrives."""
    from spark_slurm.karman.schema import cycle_dict  # noqa: PLC0415
    from spark_slurm.karman.subscriber import iter_cycles  # noqa: PLC0415

    with _stop_on_signals() as stop:
        for cycle in iter_cycles(endpoint, topic, count=count, duration_s=duration, stop=stop):
            data = cycle_dict(cycle)
            if as_json:
                click.echo(json.dumps(data, sort_keys=True), nl=True)
                continue
            parts = []
            for s in data["streams"]:
                for phase in ("phase_a", "phase_b"):
                    r = s.get(phase)
                    if r is not None:
                        parts.append(f"{s['name'].rsplit('/', 1)[-1]}.{phase[-1]} "
                                     f"{r.get('real_power_w', 0.0):7.1f} W "
                                     f"{r.get('voltage_rms', 0.0):5.1f} V "
                                     f"{r.get('current_rms', 0.0):5.2f} A")
            click.echo(f"{data['time_ns']} seq={data['seq']} total "
                       f"{data['real_power_w']:8.1f} W | " + " | ".join(parts))


@karman.command()
@click.argument("csv_path", metavar="CSV", type=click.Path(path_type=Path, dir_okay=False))
@_bind
@_topic
@click.option("--loop", is_flag=True, help="Start over at the end, forever.")
@click.option("--speed", type=float, default=1.0, show_default=True,
              help="Playback speed (2 = twice the recorded cadence).")
@_count
@_duration
@_wait
def replay(*, csv_path: Path, bind: str, topic: str, loop: bool, speed: float, count: int | None,
           duration: float | None, wait_subscriber: float) -> None:
    """Publish a recorded CSV (.csv or .csv.gz) at its recorded cadence, stamped now."""
    from spark_slurm.karman.publisher import replay_file  # noqa: PLC0415

    with _stop_on_signals() as stop:
        stats = replay_file(csv_path, bind, topic=topic, speed=speed, loop=loop, count=count,
                            duration_s=duration, stop=stop, wait_subscriber_s=wait_subscriber)
    click.echo(f"sent {stats.sent} cycles ({stats.loops} full passes, "
               f"{stats.dropped} dropped)", err=True)


@karman.command("sim")
@click.option("--gpus", "gpus_dir", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="State directory of the simulated GPUs (`sparkctl sim init`).")
@_bind
@_topic
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
@click.argument("scenario", type=click.Choice(["no-cap", "static-300", "dynamic",
                                               "dynamic-mid"]))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="CSV to write (gzip'd when it ends in .gz).")
@click.option("--seed", type=int, default=None,
              help="Random seed (default: the scenario's, as in datasets/).")
@click.option("--seconds", type=float, default=180.0, show_default=True,
              help="Length of the recording.")
def synth(scenario: str, out: Path, seed: int | None, seconds: float) -> None:
    """Write a synthetic 8×B200 recording of a reference scenario (seeded, reproducible)."""
    from spark_slurm.karman.synth import write_scenario  # noqa: PLC0415

    rows = write_scenario(scenario, out, seconds=seconds, seed=seed)
    click.echo(f"wrote {rows} rows to {out}", err=True)


@karman.command()
@_endpoint
@_topic
@click.option("--port", type=click.IntRange(0, 65535), default=9557, show_default=True,
              help="HTTP port for /metrics (0: any free port).")
@click.option("--bind-address", default="127.0.0.1", show_default=True,
              help="Address the HTTP server listens on.")
@_duration
def exporter(endpoint: str, topic: str, port: int, bind_address: str,
             duration: float | None) -> None:
    """Serve Prometheus metrics for a Karman stream (last-second statistics, counters)."""
    from spark_slurm.karman.exporter import Exporter  # noqa: PLC0415

    exp = Exporter(endpoint, topic, port=port, bind_address=bind_address)
    with _stop_on_signals() as stop:
        exp.start()
        click.echo(f"serving http://{bind_address}:{exp.port}/metrics", err=True)
        try:
            stop.wait(duration)
        finally:
            exp.stop()


@karman.command()
@_endpoint
@_topic
@click.option("--to", "to", required=True,
              help="SQLite file, or a postgresql:// URL (TimescaleDB when installed).")
@_count
@_duration
def record(endpoint: str, topic: str, to: str, count: int | None,
           duration: float | None) -> None:
    """Record every cycle of a Karman stream into a time-series table."""
    from spark_slurm.karman.recorder import record_stream  # noqa: PLC0415

    with _stop_on_signals() as stop:
        stats = record_stream(endpoint, to, topic=topic, count=count, duration_s=duration,
                              stop=stop)
    click.echo(f"recorded {stats.cycles} cycles ({stats.rows} rows)", err=True)
