"""The front's metrics of the replicas, beside the service's own (pipeline.metrics, which counts every request as
before): requests and stage times per replica, and how many replicas are ready."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Histogram

from pipeline.metrics import STAGE_BUCKETS, ServiceMetrics


class ReplicaMetrics:
    def __init__(self, metrics: ServiceMetrics, replica_counts: Callable[[], tuple[int, int]]) -> None:
        """`replica_counts`: () → (ready, total), read at each scrape."""
        self._service = metrics
        # "replica" is Serve's id for one replica process: a replacement counts under a new one.
        self._requests = Counter("zimage_replica_requests", "Image requests answered per replica, by outcome",
                                 ["replica", "outcome"], registry=metrics.registry)
        self._stage_seconds = Histogram("zimage_replica_stage_seconds", "Seconds per stage of successful requests, "
                                        "per replica", ["replica", "stage"], buckets=STAGE_BUCKETS,
                                        registry=metrics.registry)
        metrics.gauge("zimage_replicas_ready", "Replicas running and healthy, as Serve reports them",
                      lambda: replica_counts()[0])
        metrics.gauge("zimage_replicas", "Replicas asked for", lambda: replica_counts()[1])

    def request_finished(self, outcome: str, replica: str | None, stage_ms: dict[str, float] | None,
                         adapters: list[str] | None = None) -> None:
        """`replica`: None when the request never reached one (refused at the front, or queue full)."""
        self._service.request_finished(outcome, stage_ms, adapters or ())
        if replica is None:
            return
        self._requests.labels(replica, outcome).inc()
        for stage, milliseconds in (stage_ms or {}).items():
            self._stage_seconds.labels(replica, stage).observe(milliseconds / 1000)
