"""The engine's metrics on the tiny model: each outcome counted once, stage times observed for successes only."""

from __future__ import annotations

import pytest

from pipeline.engine_types import GenerationError, ServiceBusy
from pipeline.faults import FaultPlan
from pipeline.metrics import ServiceMetrics
from pipeline.requests import GenerationRequest, RequestError
from tests.helpers import SMALL, engine_with, parse_samples


def test_each_outcome_is_counted_and_only_successes_are_timed(loaded_tiny, tmp_path):
    metrics = ServiceMetrics()
    engine = engine_with(loaded_tiny, tmp_path, FaultPlan("oom", 1, every=2), metrics=metrics)
    engine.generate(GenerationRequest("a fox", seed=1, **SMALL))  # request 1: ok
    with pytest.raises(GenerationError):
        engine.generate(GenerationRequest("a fox", seed=2, **SMALL))  # request 2: out of memory
    with pytest.raises(RequestError):
        engine.generate(GenerationRequest("a fox", steps=0))
    engine.stop_accepting()
    with pytest.raises(ServiceBusy):
        engine.generate(GenerationRequest("a fox", seed=3, **SMALL))

    counted = parse_samples(metrics.text().decode())
    assert {outcome: counted[("zimage_requests_total", (("outcome", outcome),))]
            for outcome in ("ok", "failed", "rejected", "busy", "error")} == {
        "ok": 1, "failed": 1, "rejected": 1, "busy": 1, "error": 0}
    for stage in ("queue", "encode", "denoise", "decode", "save", "total"):
        assert counted[("zimage_stage_seconds_count", (("stage", stage),))] == 1
    assert counted[("zimage_stage_seconds_sum", (("stage", "denoise"),))] > 0
    assert ("process_start_time_seconds", ()) in counted
