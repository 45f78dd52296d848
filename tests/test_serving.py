"""The engine interface the web side uses: the in-process Engine and the Ray RemoteEngine both implement every
member of ServingEngine, their methods with the same parameters, and report a typed EngineStatus."""

from __future__ import annotations

import inspect

import pytest

from pipeline.engine import Engine
from pipeline.serving import EngineStatus, ServingEngine

pytest.importorskip("ray")
from scale.remote_engine import RemoteEngine  # noqa: E402  (the optional extra)

METHODS = [name for name, member in vars(ServingEngine).items()
           if inspect.isfunction(member) and not name.startswith("_")]
ATTRIBUTES = list(ServingEngine.__annotations__)


@pytest.mark.parametrize("engine_class", [Engine, RemoteEngine])
def test_each_engine_implements_the_interface_explicitly_with_its_signatures(engine_class):
    assert ServingEngine in engine_class.__mro__  # declared, not duck-typed
    for name in METHODS:
        implemented = getattr(engine_class, name)
        assert implemented is not getattr(ServingEngine, name), f"{engine_class.__name__}.{name} is not implemented"
        assert list(inspect.signature(implemented).parameters) == \
            list(inspect.signature(getattr(ServingEngine, name)).parameters), name


def test_the_in_process_engine_has_every_attribute_and_a_typed_status(engine):
    for name in ATTRIBUTES:
        assert hasattr(engine, name), name
    status = engine.status()
    assert isinstance(status, EngineStatus) and status.healthy and status.device == "cpu" and engine.gpu is None
    probe = status.for_probe()
    assert "in_flight" not in probe and "replicas_ready" not in probe and probe["serving"] == "eager"
    assert engine.state()["recent_prompts"] == [] and engine.state()["served"] == status.served


def test_the_replicas_counts_show_only_with_replicas():
    status = EngineStatus(ready=True, healthy=True, busy=False, in_flight=None, served=3, attention="sdpa",
                          compiled="on", serving="compiled", text_encoder="graphs", device="2 Serve replicas",
                          replicas_ready=1, replicas_total=2)
    assert status.for_probe()["replicas_ready"] == 1 and status.for_probe()["replicas_total"] == 2
