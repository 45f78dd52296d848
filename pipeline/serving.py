"""What the web side asks of an engine, typed: the in-process pipeline.engine.Engine, the engine in its own process
(pipeline.engine_process.ProcessEngine) and scale's RemoteEngine (the Ray Serve replicas behind one front) all
implement ServingEngine, and report an EngineStatus."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from pipeline.engine_types import AdapterInfo
from pipeline.memory import MemoryGuard
from pipeline.requests import GenerationRequest, Limits


@dataclass(frozen=True)
class EngineStatus:
    """What /readyz, the status line and the crash snapshot say of the engine."""

    ready: bool  # a warm-up generation succeeded (with replicas: at least one replica runs)
    healthy: bool  # no fatal error since
    busy: bool  # a job is out on the GPU now
    in_flight: str | None  # the ids of the jobs out now
    served: int
    attention: str | None  # the attention backend the probe chose (replicas: each one's, summed up)
    compiled: str  # off, pending, compiling, on or failed
    serving: str  # the pipeline that serves: eager or compiled
    text_encoder: str  # eager, or graphs
    device: str  # where the model runs ("cuda:0", "cpu", "2 Serve replicas")
    replicas_ready: int | None = None  # with --replicas only
    replicas_total: int | None = None
    restarting: str | None = None  # "about N s" while an engine process starts in place of one that ended
    engine_process: bool = False  # the engine runs in a child process (pipeline.engine_process), recycled on SIGUSR2

    def for_probe(self) -> dict[str, object]:
        """The fields /readyz shows: all but the job ids; the replicas' counts only with replicas, and the restart
        only during one."""
        fields = asdict(self)
        del fields["in_flight"]
        return {key: value for key, value in fields.items()
                if value is not None or key not in ("replicas_ready", "replicas_total", "restarting")}


@dataclass(frozen=True)
class GpuMemory:
    """The engine's GPU memory, in bytes: free and total on the device, and what PyTorch holds of it."""

    free: int
    total: int
    allocated: int
    reserved: int


class ServingEngine(Protocol):
    """The engine as webui and app.py use it."""

    parallel_jobs: int  # jobs on the GPU at once: one per engine (one per replica)
    limits: Limits
    output_dir: Path
    memory_guard: MemoryGuard | None  # the sizes the UI offers; None where no GPU's memory is guarded
    ready: bool
    healthy: bool
    in_flight: str | None
    running_jobs: int

    def status(self) -> EngineStatus: ...

    def gpu_memory(self) -> GpuMemory | None:
        """None where no GPU is the engine's to report (the CPU, or the replicas', which report their own);
        RuntimeError when the GPU's context is poisoned."""
        ...

    def state(self) -> dict[str, object]:
        """The status as a crash snapshot writes it, with the recent prompts."""
        ...

    def output_dir_problem(self) -> str | None: ...

    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters requests may name, by name (the engine looks at its folder again for this)."""
        ...

    def history(self, limit: int, owner: str | None) -> list[tuple[Path, dict[str, object]]]: ...

    def stop_accepting(self) -> None: ...

    def wait_idle(self, timeout: float) -> bool: ...

    def start_background_work(self, delay_s: float = 0.0) -> object: ...

    def build_attention_plans(self, sizes: Iterable[tuple[int, int]]) -> object: ...

    def generate(self, request: GenerationRequest, progress: Callable[[int, int], None] | None = None,
                 received_at: float | None = None, owner: str | None = None,
                 on_gpu_done: Callable[[], None] | None = None): ...
