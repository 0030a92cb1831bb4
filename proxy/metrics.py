"""Prometheus metrics for one proxy process, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "distillery_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "distillery_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "distillery_upstream_errors",
            "Upstream calls that failed before a response: unreachable or timed out.",
            ["kind"],
            registry=self.registry,
        )
        self.captured = Counter(
            "distillery_captured",
            "Chat completions handed to storage: queued, spooled (queue full) or sampled out.",
            ["outcome"],
            registry=self.registry,
        )

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def watch_total(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter whose value another object keeps (exposed as ``<name>_total``)."""
        self.registry.register(_ReadCounter(name, documentation, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReadCounter(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())
