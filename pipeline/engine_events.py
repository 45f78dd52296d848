"""What an engine in another process (the service's engine process, or a Serve replica) sends back to the front for
one request, in order: Started, Progress per denoising step, GpuDone, then Finished, or Refused. Plain dataclasses:
they cross the process boundary pickled, and neither side needs Ray to read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.engine import StageTimings
from pipeline.requests import ValidRequest


@dataclass(frozen=True)
class Worker:
    """Which engine process answered: its id (Serve's for a replica, new each time Serve replaces one; "engine-N"
    for the service's N-th engine process), its host and process."""

    id: str
    host: str
    pid: int


@dataclass(frozen=True)
class Started:
    """The request reached an engine: the front now knows where it runs."""

    worker: Worker


@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class GpuDone:
    """The request's GPU work is done; its image is being saved. The front may send the next request."""


@dataclass(frozen=True)
class Finished:
    """A GenerationResult's fields, and the engine process that made it. `path` is in the output dir the front
    shares."""

    request_id: str
    path: Path  # the image itself stays there: pickled through Ray it cost ~100 ms at 1024², and the front reads the file
    request: ValidRequest
    timings: StageTimings
    notices: tuple[str, ...]
    gpu_peak_bytes: int
    worker: Worker
    engine_state: dict[str, object]  # the engine's pipeline now (attention, compiled, serving, text_encoder)


@dataclass(frozen=True)
class Refused:
    """The engine's own refusal or failure (RequestError, GenerationError, ServiceBusy), its message meant for the
    caller: sent as an answer rather than raised, so Serve neither logs it as a crash nor wraps it."""

    error: Exception
