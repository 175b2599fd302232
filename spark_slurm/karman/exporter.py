"""Prometheus exporter for a Karman stream: the reference exporter's metrics, and ours beside.

Reference families (what the reference `data-exporter` serves and its dashboards
query): gauges `<quantity>_<stat>` for quantity in active_power (a copy of real
power), real_power, reactive_power, apparent_power, power_factor, rms_voltage,
rms_current, dc_offset_voltage, dc_offset_current and stat in latest, peak,
trough, average, labelled `stream` (the calculation name, `threephase/karmanN`)
and `phase` (`a` or `b`); plus `real_power_three_phase_<stat>` and
`reactive_power_three_phase_<stat>`, labelled `stream` = the ZeroMQ topic and
`phase` = a|b, whose value per message is the sum over streams of that phase.
Every statistic covers the last `window` messages (300: ~5 s at 60 Hz).

Our `karman_*` families stay beside them, always: the same window per stream ×
phase with a `stat` label, each stream's total and the rack total (`phase="sum"`,
`stream="rack"`) under the configured phase semantics, and the subscriber's
frame and error counters, which the reference families have no place for. The
window is the newest messages received, so a stream that stops leaves its last
values readable; `karman_last_cycle_age_seconds` says how stale they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from spark_slurm.clock import SYSTEM_CLOCK, Clock
from spark_slurm.errors import KarmanError
from spark_slurm.karman.schema import DEFAULT_PHASES, DEFAULT_TOPIC, Cycle, check_phases
from spark_slurm.karman.subscriber import COUNTERS, KarmanSubscriber

DEFAULT_PORT = 9105  # the reference exporter's port
WINDOW = 300  # samples per statistic, as the reference exporter keeps (5 s at 60 Hz)
STATS = ("latest", "peak", "trough", "average")
# reference metric base name -> PhaseReading field
REFERENCE_QUANTITIES = (
    ("active_power", "real_power_w"), ("real_power", "real_power_w"),
    ("reactive_power", "reactive_power_var"), ("apparent_power", "apparent_power_va"),
    ("power_factor", "power_factor"), ("rms_voltage", "voltage_rms"),
    ("rms_current", "current_rms"), ("dc_offset_voltage", "voltage_dc_offset"),
    ("dc_offset_current", "current_dc_offset"),
)
THREE_PHASE = (("real_power_three_phase", "real_power_w"),
               ("reactive_power_three_phase", "reactive_power_var"))
# PhaseReading field -> our metric name (base units, Prometheus style)
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
Key = tuple[str, str, str]


def summarize(values: list[float]) -> dict[str, float]:
    """latest / peak / trough / average of a time-ordered series."""
    return {"latest": values[-1], "peak": max(values), "trough": min(values),
            "average": sum(values) / len(values)}


def reference_stats(cycles: Iterable[Cycle], topic: str = DEFAULT_TOPIC
                    ) -> dict[Key, dict[str, float]]:
    """The reference exporter's statistics keyed by (metric base, stream label, phase).

    Per stream and phase `a`/`b`; the three-phase sums under stream = `topic`.
    A value the sender left out is left out (the reference would count it as 0);
    a stream without phase_b has no `b` series.
    """
    series: dict[Key, list[float]] = {}
    for cycle in cycles:
        sums: dict[Key, float] = {}
        for stream in cycle.streams:
            for phase, reading in stream.phases():
                letter = phase[-1]
                for metric, field in REFERENCE_QUANTITIES:
                    value = getattr(reading, field)
                    if value is not None:
                        series.setdefault((metric, stream.name, letter), []).append(value)
                for metric, field in THREE_PHASE:
                    key = (metric, topic, letter)
                    sums[key] = sums.get(key, 0.0) + (getattr(reading, field) or 0.0)
        for key, total in sums.items():
            series.setdefault(key, []).append(total)
    return {key: summarize(vals) for key, vals in series.items()}


def window_stats(cycles: Iterable[Cycle], phases: str = DEFAULT_PHASES
                 ) -> dict[Key, dict[str, float]]:
    """Our statistics keyed by (quantity field, stream, phase); phase "sum" = the stream's
    counted phases added, stream "rack" = all streams. Values missing are left out."""
    series: dict[Key, list[float]] = {}
    for cycle in cycles:
        rack: dict[str, float] = {}
        for stream in cycle.streams:
            for phase, reading in stream.phases():
                for field, _, _ in QUANTITIES:
                    value = getattr(reading, field)
                    if value is not None:
                        series.setdefault((field, stream.name, phase), []).append(value)
            sums: dict[str, float] = {}
            for _, reading in stream.counted(phases):
                for field in SUMMED:
                    value = getattr(reading, field)
                    if value is not None:
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
                 window: int = WINDOW, topic: str = DEFAULT_TOPIC,
                 phases: str = DEFAULT_PHASES) -> None:
        self.sub = sub
        self.clock = clock
        self.window = window
        self.topic = topic
        self.phases = check_phases(phases)

    def describe(self) -> list[Any]:
        return []  # metric set depends on the streams seen; skip registration-time checks

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - lazy by design
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        cycles = self.sub.last_cycles(self.window)
        ref = sorted(reference_stats(cycles, self.topic).items())
        for metric, _ in (*REFERENCE_QUANTITIES, *THREE_PHASE):
            for stat in STATS:
                fam = GaugeMetricFamily(f"{metric}_{stat}", f"{stat} {metric} over the last "
                                        f"{self.window} messages (reference data-exporter)",
                                        labels=["stream", "phase"])
                for (m, stream, phase), values in ref:
                    if m == metric:
                        fam.add_metric([stream, phase], values[stat])
                yield fam
        ours = sorted(window_stats(cycles, self.phases).items())
        for field, metric, text in QUANTITIES:
            fam = GaugeMetricFamily(metric, f"{text} over the last {self.window} messages, per "
                                    "stream and phase (phase=sum: the stream's counted phases "
                                    f"added; stream=rack: all streams; phases={self.phases})",
                                    labels=["stream", "phase", "stat"])
            for (f, stream, phase), values in ours:
                if f == field:
                    for stat in STATS:
                        fam.add_metric([stream, phase, stat], values[stat])
            yield fam
        yield GaugeMetricFamily("karman_window_cycles",
                                "Messages in the window the statistics cover",
                                value=len(cycles))
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

    def __init__(self, endpoint: str, topic: str = DEFAULT_TOPIC, *, port: int = DEFAULT_PORT,
                 bind_address: str = "127.0.0.1", window: int = WINDOW,
                 phases: str = DEFAULT_PHASES, clock: Clock = SYSTEM_CLOCK) -> None:
        if window < 1:
            raise KarmanError(f"the exporter window must be at least 1 message, not {window}")
        # Hold at least the window at the highest rate the ring is sized for (240 Hz).
        self.sub = KarmanSubscriber(endpoint, topic, buffer_seconds=max(10.0, window / 240 + 1),
                                    clock=clock, phases=phases)
        self.collector = KarmanCollector(self.sub, clock, window, topic, phases)
        self.requested_port = port
        self.bind_address = bind_address
        self.port = 0
        self._server: Any = None

    def start(self) -> int:
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
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
