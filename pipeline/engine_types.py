"""An engine's options, answers and errors as plain types: what the web side, the engine process's keeper and the
replicas' front use of an engine without importing the model libraries (diffusers, transformers: seconds of a
start, in a process that never runs the model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.requests import Limits, RequestError, ValidRequest

if TYPE_CHECKING:
    from PIL import Image

OUTPUT_DIR_UNUSABLE = ("The server cannot save images right now (its output directory is not writable or its disk "
                       "is full); the operator has to fix it. Try again later.")
RECENT_IMAGES = 2000  # the newest images (of all owners) kept in memory for the galleries' history


class GenerationError(RuntimeError):
    """A request that was valid but could not produce a usable image; the message is meant for the user."""


class ServiceBusy(GenerationError):
    """The request was not run because of the service's state (it waited too long, or the service is stopping):
    trying again later can succeed."""


def outcome_of(error: BaseException) -> str:
    """The metrics' outcome label of a request that raised `error`."""
    if isinstance(error, ServiceBusy):
        return "busy"
    if isinstance(error, RequestError):
        return "rejected"
    if isinstance(error, GenerationError):
        return "failed"
    return "error"


@dataclass(frozen=True)
class StageTimings:
    queue_ms: float  # waiting for the GPU inside the engine (the web side's admission line comes before)
    encode_ms: float  # 0 when the prompt's embeddings came from the cache
    denoise_ms: float
    decode_ms: float
    save_ms: float
    total_ms: float

    def by_stage(self) -> dict[str, float]:
        """{"queue": ms, "encode": ms, ...}: the stages by name, for metrics and API answers."""
        return {name.removesuffix("_ms"): value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    image: Image.Image | None  # None where the engine ran in another process (a scale/ replica): read `path`
    path: Path
    request: ValidRequest
    timings: StageTimings
    notices: tuple[str, ...]
    gpu_peak_bytes: int = 0  # CUDA only: the most memory the request's tensors held at once, the model included


@dataclass(frozen=True)
class EngineOptions:
    """What the engine takes from the service's settings. app.py builds it from config.Settings in one place; the
    defaults live only in config/defaults.toml."""

    limits: Limits
    output_dir: Path
    model_name: str  # in each PNG's parameters and the log
    attention: str  # the flag's choice; the probe picks among the usable backends (attention.apply_backend)
    nan_check: bool  # refuse NaN or all-black images instead of saving them
    log_prompts: str  # full | summary | none: how much of a prompt the log keeps
    hang_timeout_s: float  # a GPU call running longer than this is a hang: stacks dumped, the process ended
    queue_timeout_s: float  # a request that waited longer than this for the GPU is refused, not run late
    compile_model: bool  # compile a copy of the pipeline in the background (start_background_work)
    prompt_cache_size: int  # prompts whose embeddings are kept for reuse
    gpu_memory_limit_bytes: int  # 0: the whole GPU; else the memory guard plans within this cap
    lora_dir: Path | None = None  # LoRA adapters (*.safetensors); None, or a folder missing at start: none served
    lora_max_rank: int = 0  # the rank of the adapter slots: one request's adapters together (0: none served)


@dataclass(frozen=True)
class AdapterInfo:
    """What the service tells of an adapter: in GET /v1/loras, the UI's choices, the PNG's parameters."""

    name: str  # the file's stem
    rank: int  # the largest of its layers' ranks: what it takes of the slots
    size_bytes: int
    layers: int  # linear layers of the DiT it changes
    short_hash: str  # A1111's AutoV3 hash, cut as its "Lora hashes" field writes it
