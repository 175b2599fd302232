"""Prometheus `/metrics` for one daemon: its own registry, served on loopback.

A registry per instance (not the process-global default) keeps two daemons in
one test process apart and exposes nothing the daemon did not register.
prometheus_client is imported here only, when metrics are built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from spark_slurm.gpu.backend import Sample

log = logging.getLogger("sparkd.metrics")


class DaemonMetrics:
    """Gauges, counters and the validation-latency histogram of one sparkd."""

    def __init__(self, node: str, karman_stats: Callable[[], Mapping[str, Any]] | None = None,
                 rate_limited: Callable[[], int] | None = None) -> None:
        from prometheus_client import (  # noqa: PLC0415 (lazy by design)
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
        )

        self.registry = CollectorRegistry(auto_describe=True)
        self.node = node
        self._server: Any = None
        self._thread: Any = None
        labels = ["node", "gpu"]
        self.power = Gauge("spark_gpu_power_watts", "GPU power draw", labels,
                           registry=self.registry)
        self.limit = Gauge("spark_gpu_power_limit_watts", "Enforced GPU power limit", labels,
                           registry=self.registry)
        self.governed = Gauge("spark_gpu_governed_limit_watts", "Last governed limit", labels,
                              registry=self.registry)
        self.temp = Gauge("spark_gpu_temperature_celsius", "GPU temperature", labels,
                          registry=self.registry)
        self.energy = Gauge("spark_gpu_energy_joules", "GPU energy counter", labels,
                            registry=self.registry)
        self.pers = Counter("spark_pers", "PERs committed, by kind and decision",
                            ["node", "kind", "decision"], registry=self.registry)
        self.latency = Histogram(
            "spark_validation_seconds", "Request handling time up to the durable commit",
            ["node", "op"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5))
        self.head = Gauge("spark_ledger_head_seq", "Sequence number of the ledger head",
                          ["node"], registry=self.registry)
        self.events = Counter("spark_automation_events", "Drift, fault, thermal events",
                              ["node", "event"], registry=self.registry)
        self.facility = Counter("spark_facility_verdicts", "Facility follow-up verdicts",
                                ["node", "verdict"], registry=self.registry)
        self.jobs = Gauge("spark_jobs_governed", "Jobs holding caps on this node", ["node"],
                          registry=self.registry)
        if rate_limited is not None:
            self.registry.register(_RateLimited(node, rate_limited))
        if karman_stats is not None:
            karman = Gauge("spark_karman_stream", "Karman subscriber statistics",
                           ["node", "stat"], registry=self.registry)
            self._karman = karman
            self._karman_stats = karman_stats

    def watch(self, disk: Any, gate: Any, service: Any) -> None:
        """Disk, connection and unrecorded-answer figures, read at each scrape."""
        self.registry.register(_Health(self.node, disk, gate, service))

    def refresh_karman(self) -> None:
        stats = getattr(self, "_karman_stats", None)
        if stats is None:
            return
        try:
            for name, value in stats().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._karman.labels(self.node, str(name)).set(value)
        except Exception as exc:
            log.debug("karman stats unavailable: %s", exc)

    def observe_sample(self, gpu: int, sample: Sample, governed_mw: int | None) -> None:
        g = str(gpu)
        self.power.labels(self.node, g).set(sample.power_mw / 1000)
        self.limit.labels(self.node, g).set(sample.enforced_mw / 1000)
        self.temp.labels(self.node, g).set(sample.temp_mc / 1000)
        self.energy.labels(self.node, g).set(sample.energy_mj / 1000)
        if governed_mw is not None:
            self.governed.labels(self.node, g).set(governed_mw / 1000)

    def observe_commit(self, kind: str, body: Mapping[str, Any], seq: int) -> None:
        decision = body.get("decision")
        if isinstance(decision, Mapping):
            label = str(decision.get("action", "none"))
        elif isinstance(decision, str):
            label = decision
        else:
            label = str(body.get("verdict") or body.get("action") or "none")
        self.pers.labels(self.node, kind, label).inc()
        self.head.labels(self.node).set(seq)
        if kind == "facility":
            self.facility.labels(self.node, str(body.get("verdict"))).inc()

    def observe_latency(self, op: str, seconds: float) -> None:
        self.latency.labels(self.node, op).observe(seconds)

    def count(self, event: str) -> None:
        self.events.labels(self.node, event).inc()

    def serve(self, address: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (port 0 = disabled)."""
        if port == 0:
            return 0
        from prometheus_client import start_http_server  # noqa: PLC0415 (lazy)

        self._server, self._thread = start_http_server(port, addr=address,
                                                       registry=self.registry)
        return int(self._server.server_port)

    def render(self) -> bytes:
        from prometheus_client import generate_latest  # noqa: PLC0415 (lazy)

        self.refresh_karman()
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _RateLimited:
    """`spark_requests_rate_limited_total`: read from the refusal limiter at each scrape,
    so the request path keeps no metrics handle (each is also in a summary PER)."""

    def __init__(self, node: str, total: Callable[[], int]) -> None:
        self._node = node
        self._total = total

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415 (lazy)

        family = CounterMetricFamily(
            "spark_requests_rate_limited", "Requests answered rate-limited after the "
            "requesting uid ran out of refusal budget", labels=["node"])
        family.add_metric([self._node], self._total())
        yield family


class _Health:
    """What keeps the node usable, read from the daemon's parts at each scrape:
    `spark_healthy`, `spark_disk_free_bytes{path}`, `spark_disk_full`,
    `spark_connections_open`, `spark_connections_refused_total{reason}` (turned away
    busy: pool, per-uid, rate, idle-timeout, partial-timeout),
    `spark_connections_timed_out_total`, `spark_requests_unrecorded_total`
    (answered disk-full; recorded once space is back) and
    `spark_requests_read_total{op}` (status and ingest: counted, not recorded)."""

    def __init__(self, node: str, disk: Any, gate: Any, service: Any) -> None:
        self._node = node
        self._disk = disk
        self._gate = gate
        self._service = service

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 (lazy)
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        node = self._node
        healthy = GaugeMetricFamily("spark_healthy", "1 when sparkd reports itself healthy "
                                    "(the health check drains the node otherwise)",
                                    labels=["node"])
        healthy.add_metric([node], 1.0 if self._disk.healthy else 0.0)
        yield healthy
        free = GaugeMetricFamily("spark_disk_free_bytes", "Free bytes on the filesystems of "
                                 "the ledger, state and journal", labels=["node", "path"])
        for space in self._disk.free():
            free.add_metric([node, space.path], float(space.free_bytes))
        yield free
        full = GaugeMetricFamily("spark_disk_full", "1 while a write has failed for lack of "
                                 "space and space has not come back", labels=["node"])
        full.add_metric([node], 1.0 if self._disk.full else 0.0)
        yield full
        opened = GaugeMetricFamily("spark_connections_open", "Open socket connections",
                                   labels=["node"])
        opened.add_metric([node], float(self._gate.open))
        yield opened
        refused = CounterMetricFamily("spark_connections_refused", "Connections and requests "
                                      "turned away busy, by reason", labels=["node", "reason"])
        for reason, n in sorted(self._gate.refused().items()):
            refused.add_metric([node, reason], float(n))
        yield refused
        timed = CounterMetricFamily("spark_connections_timed_out", "Connections closed for "
                                    "sending no complete request in time", labels=["node"])
        timed.add_metric([node], float(self._gate.timed_out))
        yield timed
        unrecorded = CounterMetricFamily("spark_requests_unrecorded", "Requests answered "
                                         "disk-full (recorded once space is back)",
                                         labels=["node"])
        users = sum(self._service.unrecorded.totals().values())
        unrecorded.add_metric([node], float(users + self._service.kept_total))
        yield unrecorded
        reads = CounterMetricFamily("spark_requests_read", "Read-only requests answered "
                                    "(status, ingest): counted, not recorded as PERs",
                                    labels=["node", "op"])
        for op, n in sorted(dict(self._service.reads).items()):
            reads.add_metric([node, op], float(n))
        yield reads
