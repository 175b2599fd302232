"""Prometheus exporter for a Karman stream: the statistics the reference exporter gives.

For every stream × phase × quantity (real, apparent, reactive power, voltage,
current, power factor): latest, peak, trough and average over the last second of
cycles; the same for each stream's sum over its phases and for the rack total;
plus the subscriber's frame and error counters. "The last second" is the second
ending at the newest cycle received, so a stream that stops leaves its last
values readable rather than dropping to nothing; `karman_last_cycle_age_seconds`
says how stale they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import KarmanError
from spark_slurm.karman.schema import DEFAULT_TOPIC, Cycle
from spark_slurm.karman.subscriber import COUNTERS, KarmanSubscriber

# PhaseReading field -> metric name (base units, Prometheus style)
QUANTITIES = (
    ("real_power_w", "karman_real_power_watts", "Real power"),
    ("apparent_power_va", "karman_apparent_power_voltamperes", "Apparent power"),
    ("reactive_power_var", "karman_reactive_power_voltamperes_reactive", "Reactive power"),
    ("voltage_rms", "karman_voltage_rms_volts", "RMS voltage"),
    ("current_rms", "karman_current_rms_amperes", "RMS current"),
    ("power_factor", "karman_power_factor_ratio", "Power factor"),
)
# Quantities that add up over a stream's phases (voltage and power factor do not).
SUMMED = ("real_power_w", "apparent_power_va", "reactive_power_var", "current_rms")
STATS = ("latest", "peak", "trough", "average")


def summarize(values: list[float]) -> dict[str, float]:
    """latest / peak / trough / average of a time-ordered series."""
    return {"latest": values[-1], "peak": max(values), "trough": min(values),
            "average": sum(values) / len(values)}


def second_stats(cycles: Iterable[Cycle]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Statistics keyed by (quantity field, stream, phase); phase "sum" = stream total,
    stream "rack" = all streams. Values missing from a cycle are left out."""
    series: dict[tuple[str, str, str], list[float]] = {}
    for cycle in cycles:
        rack: dict[str, float] = {}
        for stream in cycle.streams:
            sums: dict[str, float] = {}
            for phase, reading in stream.phases():
                for field, _, _ in QUANTITIES:
                    value = getattr(reading, field)
                    if value is None:
                        continue
                    series.setdefault((field, stream.name, phase), []).append(value)
                    if field in SUMMED:
                        sums[field] = sums.get(field, 0.0) + value
            for field, total in sums.items():
                series.setdefault((field, stream.name, "sum"), []).append(total)
                rack[field] = rack.get(field, 0.0) + total
        for field, total in rack.items():
            series.setdefault((field, "rack", "sum"), []).append(total)
    return {key: summarize(vals) for key, vals in series.items()}


class KarmanCollector:
    """prometheus_client custom collector reading a running KarmanSubscriber at scrape time."""

    def __init__(self, sub: KarmanSubscriber, clock: Clock = SYSTEM_CLOCK,
                 window_s: float = 1.0) -> None:
        self.sub = sub
        self.clock = clock
        self.window_s = window_s

    def describe(self) -> list[Any]:
        return []  # metric set depends on the streams seen; skip registration-time checks

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - lazy by design
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        cycles = self.sub.recent_cycles(self.window_s)
        stats = second_stats(cycles)
        for field, metric, text in QUANTITIES:
            fam = GaugeMetricFamily(metric, f"{text} over the last second, per stream and "
                                    "phase (phase=sum: the stream's phases added; "
                                    "stream=rack: all streams)",
                                    labels=["stream", "phase", "stat"])
            for (f, stream, phase), values in sorted(stats.items()):
                if f == field:
                    for stat in STATS:
                        fam.add_metric([stream, phase, stat], values[stat])
            yield fam
        window = GaugeMetricFamily("karman_window_cycles",
                                   "Cycles in the last-second window the statistics cover")
        window.add_metric([], len(cycles))
        yield window
        age = GaugeMetricFamily("karman_last_cycle_age_seconds",
                                "Seconds since the newest cycle's time (NaN: none yet)")
        latest = self.sub.latest_time_ns()
        age.add_metric([], float("nan") if latest is None
                       else (self.clock.now_ns() - latest) / 1e9)
        yield age
        counts = self.sub.stats()
        for name in COUNTERS:
            fam_c = CounterMetricFamily(f"karman_{name}", f"Karman subscriber counter: {name}")
            fam_c.add_metric([], counts[name])
            yield fam_c


class Exporter:
    """A subscriber plus an HTTP /metrics server; `port` is known once started."""

    def __init__(self, endpoint: str, topic: str = DEFAULT_TOPIC, *, port: int = 9557,
                 bind_address: str = "127.0.0.1", clock: Clock = SYSTEM_CLOCK) -> None:
        self.sub = KarmanSubscriber(endpoint, topic, buffer_seconds=10, clock=clock)
        self.clock = clock
        self.requested_port = port
        self.bind_address = bind_address
        self.port = 0
        self._server: Any = None

    def start(self) -> int:
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

        registry = CollectorRegistry(auto_describe=False)
        registry.register(KarmanCollector(self.sub, self.clock))
        self.sub.start()
        try:
            self._server, _ = start_http_server(self.requested_port, self.bind_address,
                                                registry=registry)
        except OSError as exc:
            self.sub.stop()
            raise KarmanError(f"cannot serve metrics on {self.bind_address}:"
                              f"{self.requested_port}: {exc.strerror or exc}") from exc
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.sub.stop()

    def serve(self, stop: threading.Event, duration_s: float | None = None) -> None:
        """Run until stop is set (or duration passes), then shut down."""
        self.start()
        try:
            stop.wait(duration_s)
        finally:
            self.stop()
