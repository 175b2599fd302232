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
