"""Prometheus metrics for the proxy: one process, or every worker of ``--workers N``.

With one process, metrics live in a registry of the app's own (several apps in
one test process never mix), plus that process's ``process_*`` metrics.

With ``--workers N`` every scrape lands on one worker, chosen by the kernel, so a
per-process view would report one worker's counters each time and look like
resets to Prometheus.  The supervisor therefore starts the workers with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client's multiprocess mode): each
worker writes its values to memory-mapped files there and any worker's
``/metrics`` serves the sum.  Gauges are summed over live workers; the
``process_*`` metrics are left out in that mode, since they would describe only
the worker that happened to answer.

Everything that counts events is a counter (``_total``); levels (records held in
memory) are gauges.  The capture writer is one process for all workers: its counters
and the spool's size are read from its status file at each scrape, never summed.
Labels that come from traffic (model, app) are bounded: past 64 distinct values
in a process, new ones are counted as ``other``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_LABEL_VALUES = 64

# What the request path counts, by Capture's attribute name: (metric, help).
CAPTURE_EVENTS = {
    "spool_write_errors": (
        "distillery_spool_write_errors",
        "Records the spool could not write (disk full?); they wait in memory.",
    ),
    "dropped": (
        "distillery_capture_dropped",
        "Records lost: the spool failed and the memory buffer was full.",
    ),
    "repaired": (
        "distillery_capture_flattened",
        "Records nested too deeply to write as they were: the deep part kept as text.",
    ),
}
# What the writer process counts (read from its status file at each scrape).
WRITER_COUNTERS = {
    "stored": ("distillery_capture_stored", "Records the writer has stored in the database."),
    "write_errors": (
        "distillery_capture_write_errors",
        "Database writes that failed (records stay spooled).",
    ),
    "repaired": (
        "distillery_capture_repaired",
        "Records the database refused as they were, stored after repair.",
    ),
    "dead_lettered": (
        "distillery_capture_dead_lettered",
        "Records the database refused even after repair (see the dead-letter file).",
    ),
}


def shared() -> bool:
    """True in a worker of ``--workers N``: values go to the shared directory."""
    return bool(os.environ.get(MULTIPROC_ENV))


class _Bounded:
    """Label values from traffic, at most ``MAX_LABEL_VALUES`` distinct ones."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        value = value or "none"
        if value in self.seen:
            return value
        if len(self.seen) >= MAX_LABEL_VALUES:
            return "other"
        self.seen.add(value)
        return value


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        own: CollectorRegistry | None = None
        if shared():
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            own = self.registry
            ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "distillery_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "distillery_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["route"],
            buckets=BUCKETS,
            registry=own,
        )
        self.upstream_errors = Counter(
            "distillery_upstream_errors",
            "Upstream calls that failed before a response: unreachable or timed out.",
            ["kind"],
            registry=own,
        )
        self.captured = Counter(
            "distillery_captured",
            "Chat completions handed to storage: spooled, buffered, dropped, sampled out, failed.",
            ["outcome"],
            registry=own,
        )
        self.chat_latency = Histogram(
            "distillery_chat_duration_seconds",
            "Chat completions: time from request to the end of the answer, by model and app.",
            ["model", "app"],
            buckets=BUCKETS,
            registry=own,
        )
        self.ttft = Histogram(
            "distillery_time_to_first_token_seconds",
            "Streamed chat completions: time to the first byte of the stream, by model and app.",
            ["model", "app"],
            buckets=BUCKETS,
            registry=own,
        )
        self.tokens = Counter(
            "distillery_tokens",
            "Tokens the upstream reported, by model, app and kind (prompt, completion).",
            ["model", "app", "kind"],
            registry=own,
        )
        self.capture_events = {
            name: Counter(metric, help_text, registry=own)
            for name, (metric, help_text) in CAPTURE_EVENTS.items()
        }
        self.memory_buffered = Gauge(
            "distillery_capture_memory_buffered",
            "Records held in memory because the spool could not take them.",
            multiprocess_mode="livesum",
            registry=own,
        )
        self.route_shadow = Counter(
            "distillery_route_shadow",
            "Shadow calls to a route's student: graded, student_error, dropped (queue full), "
            "lost (the judge crashed or stopped first), failed (grading broke).",
            ["route", "outcome"],
            registry=own,
        )
        self.route_served = Counter(
            "distillery_route_served",
            "Routed calls, by who answered: teacher or student.",
            ["route", "served_by"],
            registry=own,
        )
        self.route_fallbacks = Counter(
            "distillery_route_fallbacks",
            "Calls the student was to answer that the teacher answered, by why.",
            ["route", "reason"],
            registry=own,
        )
        self.route_mode = Counter(
            "distillery_route_mode_changes",
            "A route's mode changed (a command or the automatic policy), by the new mode.",
            ["route", "mode"],
            registry=own,
        )
        self.route_standing = Gauge(
            "distillery_route_standing",
            "Each route's graded evidence, as `distillery routes status` has it: stat is "
            "samples, score, ci_low, ci_high or bar (absent while there is none).",
            ["route", "stat"],
            multiprocess_mode="livemostrecent",
            registry=own,
        )
        self._model = _Bounded()
        self._app = _Bounded()
        # Children by label values (bounded: routes and statuses, and _Bounded's values).
        self._answered: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._chat: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._captured: dict[str, Any] = {}

    def capture_event(self, name: str, count: int) -> None:
        self.capture_events[name].inc(count)

    def buffered(self, count: int) -> None:
        self.memory_buffered.set(count)

    def watch_writer(self, spool: Path) -> None:
        """Serve the writer's counters, and the spool's size, from ``spool``."""
        self.registry.register(_WriterCollector(spool))

    def answered(self, route: str, status: int, seconds: float) -> None:
        """One request answered: counted by route and status, timed by route."""
        children = self._answered.get((route, status))
        if children is None:  # labels() is a lock and a lookup each time: once per pair
            children = (self.requests.labels(route, str(status)), self.latency.labels(route))
            self._answered[route, status] = children
        children[0].inc()
        children[1].observe(seconds)

    def capture_outcome(self, outcome: str) -> None:
        """One chat completion handed to capture (or not): counted by outcome."""
        child = self._captured.get(outcome)
        if child is None:
            child = self._captured[outcome] = self.captured.labels(outcome)
        child.inc()

    def chat(
        self,
        model: str | None,
        app: str | None,
        seconds: float,
        ttft_seconds: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """One chat completion's latency, time to first token and tokens."""
        labels = (self._model(model), self._app(app))
        children = self._chat.get(labels)
        if children is None:
            children = (
                self.chat_latency.labels(*labels),
                self.ttft.labels(*labels),
                self.tokens.labels(*labels, "prompt"),
                self.tokens.labels(*labels, "completion"),
            )
            self._chat[labels] = children
        latency, ttft, prompt, completion = children
        latency.observe(seconds)
        if ttft_seconds is not None:
            ttft.observe(ttft_seconds)
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            completion.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WriterCollector(Collector):
    """The writer process's counters, as its status file has them, and the spool's size:
    one writer and one spool for every worker, so never summed over workers."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        from distillery.proxy.spool import pending_bytes
        from distillery.proxy.writer import WriterStatus

        status = WriterStatus.of(self.spool)
        if status is not None:
            for name, (metric, help_text) in WRITER_COUNTERS.items():
                family = CounterMetricFamily(metric, help_text)
                family.add_metric([], getattr(status, name))
                yield family
        yield GaugeMetricFamily(
            "distillery_spool_bytes",
            "Bytes in spool segments not yet deleted (records not yet known to be stored).",
            value=pending_bytes(self.spool),
        )
