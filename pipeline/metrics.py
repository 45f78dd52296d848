"""Prometheus metrics of the service: what the engine did with each request, and how long each stage took.

The engine records outcomes and stage times; the web layer adds the live gauges it alone can see (queue depth)
and serves the registry as text at /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily

OUTCOMES = ("ok", "rejected", "busy", "failed", "error")
STAGES = ("queue", "encode", "denoise", "decode", "save", "total")
# From a cached prompt's 0 s encode to a 2048² image on a CPU; the GPU's 1024² image lands around 1 s.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceMetrics:
    """One registry per service, so tests can run several side by side without sharing counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_start_time_seconds and friends: a restart shows as a new start time and counters back at 0.
        ProcessCollector(registry=self.registry)
        self._requests = Counter("zimage_requests", "Image requests by outcome: ok, rejected (bad input or too "
                                 "large), busy (queue timeout, shutting down), failed (e.g. out of memory, NaN), "
                                 "error (internal)", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self._requests.labels(outcome)
        self._stage_seconds = Histogram("zimage_stage_seconds", "Seconds per stage of successful requests",
                                        ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        for stage in STAGES:
            self._stage_seconds.labels(stage)
        # One label per adapter file of the server's folder: as many series as the operator put files there.
        self._adapter_images = Counter("zimage_adapter_images", "Images made with each LoRA adapter, by its name",
                                       ["adapter"], registry=self.registry)

    def request_finished(self, outcome: str, stage_ms: dict[str, float] | None = None,
                         adapters: Iterable[str] = ()) -> None:
        """One request's end; an image made (outcome ok) counts toward each adapter it was made with."""
        self._requests.labels(outcome).inc()
        if outcome == "ok":
            for name in adapters:
                self._adapter_images.labels(name).inc()
        for stage, milliseconds in (stage_ms or {}).items():
            self._stage_seconds.labels(stage).observe(milliseconds / 1000)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A value read at each scrape (queue depth, GPU memory, ...)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def counter_read(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A count kept elsewhere (it only grows), read at each scrape as `name`_total."""
        self.registry.register(_ReadCounter(name, documentation, read))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _ReadCounter:
    """A collector of one counter whose value is read at each scrape (prometheus_client's Counter cannot read)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]):
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())
