"""What an engine in another process (the service's engine process, or a Serve replica) sends back to the front for
one request, in order: Started, Progress per denoising step, GpuDone, then Finished, or Refused; and, below, what
the front and an engine process tell each other besides. Plain dataclasses: they cross the process boundary
pickled, neither side needs Ray to read them, and the front reads them without the model libraries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.engine_types import AdapterInfo, EngineOptions, StageTimings
from pipeline.faults import FaultPlan
from pipeline.memory import MemoryGuard
from pipeline.requests import GenerationRequest, ValidRequest

ENGINE_STATE_KEYS = ("attention", "compiled", "serving", "text_encoder")  # what the front shows of an engine


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


# -- what the front and an engine process tell each other besides one request's events ------------------------------

@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine process (or a Serve replica) needs to build its engine; pickled to it, so plain values
    only. app.py fills it from Settings (EngineOptions through app.engine_options)."""

    model_dir: Path  # with replicas: the same path on every host (a shared or copied weights dir)
    device: str  # auto | cuda | cpu (Ray sets a replica's CUDA_VISIBLE_DEVICES to its own GPU)
    options: EngineOptions  # output_dir: shared with the front
    crash_dir: Path
    verify_weights: bool = False
    compile_cache_dir: Path | None = None  # CUDA with compile on: kernels kept across restarts
    # On CUDA, as pipeline.acceleration.load_for_serving applies them; the memory cap comes from
    # options.gpu_memory_limit_bytes.
    low_vram: bool = False
    compile_delay_s: float = 10.0
    plan_sizes: tuple[tuple[int, int], ...] = ()  # attention plans built after warm-up: the UI's sizes
    log_level: str = "INFO"
    faults: FaultPlan = FaultPlan()  # test-only failures, as app.py reads them from ZIMAGE_FAULT


@dataclass(frozen=True)
class Load:
    """Front → standby: load `spec`'s engine and serve it, as engine process number `number`."""

    spec: EngineSpec
    number: int


@dataclass(frozen=True)
class Job:
    """Front → engine: generate `request`. `received_at`: time.monotonic() at the request's arrival (one clock for
    every process of the machine)."""

    ticket: int
    request: GenerationRequest
    received_at: float | None
    owner: str | None


@dataclass(frozen=True)
class StandingBy:
    """Engine → front: the libraries are imported; Load may come."""

    seconds: float  # the imports took this long


@dataclass(frozen=True)
class Retire:
    """Front → engine: exit now (no job is out); the standby takes over. For the GPU-memory watermark."""


@dataclass(frozen=True)
class Ready:
    """Engine → front: warmed up and serving."""

    worker: Worker
    memory_guard: MemoryGuard | None
    device: str
    source: str
    seconds: float  # from Load to ready


@dataclass(frozen=True)
class StartFailed:
    """Engine → front: the engine could not be built; `exit_code` as app.py's start would give it."""

    message: str
    exit_code: int


@dataclass(frozen=True)
class Heartbeat:
    """Engine → front, every HEARTBEAT_S: the engine's state and its GPU's memory."""

    state: dict[str, object]  # {} while the engine loads
    gpu_memory: dict[str, int] | None  # free, total, allocated, reserved (bytes); None off the GPU
    adapters: tuple[AdapterInfo, ...] = ()  # the LoRA adapters requests may name (the folder is looked at each time)


@dataclass(frozen=True)
class Fatal:
    """Engine → front, just before the engine process ends after an error that leaves its GPU unusable."""

    reason: str
