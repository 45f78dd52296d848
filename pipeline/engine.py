"""The engine: one request in, one saved image out, one GPU job at a time."""

from __future__ import annotations

import contextvars
import gc
import hashlib
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import acceleration, attention, memory
from pipeline.adapters import (
    Adapter,
    AdapterLibrary,
    AdapterSlots,
    linear_layers,
    lora_view,
)
from pipeline.edits import EditLatents, edit_sigmas
from pipeline.engine_types import (
    OUTPUT_DIR_UNUSABLE,
    RECENT_IMAGES,
    AdapterInfo,
    EngineOptions,
    GenerationError,
    GenerationResult,
    ServiceBusy,
    StageTimings,
    outcome_of,
)
from pipeline.faults import FaultPlan
from pipeline.hangs import HangWatch
from pipeline.loader import LoadedPipeline
from pipeline.memory import MemoryGuard
from pipeline.messages import first_line
from pipeline.metrics import ServiceMetrics
from pipeline.output_dir import OutputDirCheck
from pipeline.requests import (
    Edit,
    GenerationRequest,
    RequestError,
    ValidRequest,
    shown,
    validate,
)
from pipeline.serving import EngineStatus, GpuMemory, ServingEngine
from pipeline.storage import RecentImages, a1111_parameters, save_image
from pipeline.text_encoder import MAX_SEQUENCE_LENGTH, PromptEncoder

log = logging.getLogger("zimage.engine")

GUIDANCE_SCALE = 0.0  # Turbo is distilled to run without classifier-free guidance
BLACK_LEVEL = 2  # an image whose brightest pixel is at most this (of 255) is treated as a failed, black one

ProgressCallback = Callable[[int, int], None]
FatalHandler = Callable[[BaseException, dict[str, object]], None]  # (error, engine state)

# After one of these the CUDA context is poisoned: every later call fails too, so the process cannot serve again.
# The engine hands them to its fatal handler, which ends the process so the supervisor starts a clean one.
POISONED_GPU_MARKERS = (
    "CUDA error", "illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
    "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "NCCL error", "ECC error",
)
RECENT_PROMPTS = 3  # kept (as logged: summarised or not) for the crash snapshot
# The compiled path goes live only after these: every graph a request can need is compiled by then. Non-square
# first: a square warm-up would let the compiler assume width == height ("duck sizing") and compile again for the
# first non-square request. The small size takes the other side of size-dependent kernel choices (the CPU's
# convolution backend changes below about 300² pixels). Prompts of different padded lengths (the caption is padded
# to a multiple of 32 tokens) keep the sequence length symbolic.
COMPILE_WARM_UP_SIZES = ((768, 512), (1024, 1024), (256, 256))
# While compiling, the interpreter hands itself over this often (Python's default: every 5 ms). Every torch op
# releases the interpreter around its kernel launch, and with the compiler's Python waiting, the serving thread got
# it back only a whole interval later, op after op: on an H100 an eager 1024² image served during a compile took
# 2.6-3.5 s (encode 0.8-1.9 s) instead of 1.4 s.
COMPILE_SWITCH_INTERVAL_S = 0.0002
ADAPTER_RESCAN_S = 1.0  # the adapter folder is looked at again at most this often (when asked for its adapters)
COMPILE_WARM_UP_PROMPTS = ("warm-up", "a warm-up prompt long enough to fill more than one block of thirty-two "
                           "tokens of the caption, so that the caption length is not taken for a constant", "small")


def is_poisoned_gpu_error(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError) and any(
        marker in str(error) for marker in POISONED_GPU_MARKERS)


@dataclass
class Rendered:
    """One generation's image, before it is saved."""

    image: Image.Image
    stage_ms: dict[str, float]  # encode_ms, denoise_ms, decode_ms
    notices: list[str]
    denoise_peak_bytes: int = 0  # CUDA only: peak allocated while encoding and denoising (the DiT's activations)
    decode_peak_bytes: int = 0  # CUDA only: peak allocated while decoding (the VAE's activations)
    adapters_ms: float = 0.0  # writing the request's adapters into the slots (0: they held them already, or none)


def _warm_up_request(width: int, height: int | None = None, prompt: str = "warm-up") -> ValidRequest:
    return ValidRequest(prompt=prompt, width=width, height=height or width, steps=1, seed=0, shift=3.0)


def _probe_edit(side: int) -> Edit:
    """A grey square picture with its left half to repaint, at full strength (every step runs)."""
    mask = np.zeros((side, side), np.uint8)
    mask[:, : side // 2] = 255
    return Edit(image=np.full((side, side, 3), 128, np.uint8), mask=mask, strength=1.0, digest="probe")


def _loras_field(valid: ValidRequest, load_ms: float) -> str:
    """The request log line's adapters and the time writing them into the slots took (0: the slots held them):
    " loras=name:0.8,other:-0.5 lora_load_ms=4.1", or nothing."""
    if not valid.loras:
        return ""
    loras = ",".join(f"{choice.name}:{choice.scale:g}" for choice in valid.loras)
    return f" loras={loras} lora_load_ms={load_ms:.1f}"


def _edit_field(valid: ValidRequest) -> str:
    """" mode=inpaint strength=1 source=…" for an edit, " format=webp" for an image not saved as PNG; or nothing."""
    edit = "" if valid.edit is None else (f" mode={valid.edit.mode} strength={valid.edit.strength:g} "
                                          f"source={valid.edit.digest}")
    return edit + ("" if valid.output_format == "png" else f" format={valid.output_format}")


def summarize_prompt(prompt: str, mode: str) -> str:
    if mode == "full":
        return repr(prompt)
    if mode == "none":
        return f"len={len(prompt)}"
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    first_words = " ".join(prompt.split()[:6])[:48]
    return f"len={len(prompt)} sha={digest} start={first_words!r}"


class Engine(ServingEngine):
    parallel_jobs = 1  # the GPU runs one job at a time: the front's queue lets one through (scale's: one per replica)

    def __init__(self, loaded: LoadedPipeline, options: EngineOptions, *, faults: FaultPlan = FaultPlan(),
                 on_fatal: FatalHandler | None = None, metrics: ServiceMetrics | None = None,
                 compile_backend: str | Callable = "inductor") -> None:
        """`faults`: test-only failures to inject; `on_fatal`: called after an error that leaves the GPU unusable
        (app.py's ends the process); `compile_backend`: torch.compile's (tests pass a deliberately slow one)."""
        limits, output_dir = options.limits, options.output_dir
        self._pipe = loaded.pipe
        self._pipe.set_progress_bar_config(disable=True)  # progress goes to the caller, not to tqdm on stderr
        self.device = loaded.device
        self.gpu = loaded.device if loaded.device.type == "cuda" else None
        self.dtype = loaded.dtype
        self.limits = limits
        self.output_dir = output_dir
        self._output_dir_check = OutputDirCheck(output_dir)
        self._recent_images = RecentImages(output_dir, keep=RECENT_IMAGES)
        self.model_name = options.model_name
        self.nan_check = options.nan_check
        self.log_prompts = options.log_prompts
        self._faults = faults
        self._on_fatal = on_fatal
        self._lock = threading.Lock()  # the GPU runs one job at a time, whoever calls
        # ...and always on this one thread. PyTorch keeps cuDNN's attention plans (one per sequence length) and
        # cuBLAS handles per thread: run on whichever worker thread the web server picked, a request rebuilt them
        # (tens of ms each) although the process had built the same ones before.
        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._active = 0  # requests between validation and saved PNG; the save runs outside the GPU lock
        self._idle = threading.Condition()
        self._answered = threading.Event()  # set once a request has produced its image
        self._attention_choice = options.attention
        self.attention_backend: str | None = None  # chosen by warm_up's probe
        self.compile_model = options.compile_model
        self.compile_backend = compile_backend
        self.compiled = "off" if not options.compile_model else "pending"  # → compiling → on, or failed (eager)
        self.serving = "eager"  # → "compiled" once the compiled pipeline is warm and swapped in
        self._prompt_encoder = PromptEncoder(loaded.pipe.tokenizer, loaded.pipe.text_encoder, self.device)
        self._prompt_cache: OrderedDict[str, tuple[list[torch.Tensor], list[str]]] = OrderedDict()
        self._prompt_cache_size = options.prompt_cache_size
        self.gpu_memory_limit_bytes = options.gpu_memory_limit_bytes
        self._metrics = metrics or ServiceMetrics()
        self.memory_guard: MemoryGuard | None = None  # set by warm_up on CUDA
        self.ready = False  # a warm-up generation succeeded on the device
        self.healthy = True  # no fatal error since; /readyz needs both
        self.in_flight: str | None = None  # id of the request on the GPU now
        self.served = 0
        self._recent_prompts: deque[str] = deque(maxlen=RECENT_PROMPTS)
        self._draining = False
        self._started = 0  # requests that reached the GPU
        self.queue_timeout_s = options.queue_timeout_s
        self._hangs = HangWatch(options.hang_timeout_s, self._on_hang)
        self._adapters: AdapterLibrary | None = None
        self._slots: AdapterSlots | None = None
        self._lora_pipe = None  # the pipeline over the adapter slots' view of the DiT: eager, later compiled
        self._adapters_lock = threading.Lock()
        self._adapters_looked_at = float("-inf")
        if options.lora_dir is not None and options.lora_max_rank > 0:
            self._serve_adapters(options.lora_dir, options.lora_max_rank)

    def _serve_adapters(self, folder: Path, rank: int) -> None:
        """The adapter slots over the DiT, and the folder's adapters read, if the folder exists; otherwise the
        service runs without adapters (the slots cost GPU memory and a compile of their own)."""
        if not folder.is_dir():
            log.info("adapters: off (no folder %s; create it and restart to serve LoRA adapters)", folder)
            return
        transformer = self._pipe.transformer
        self._adapters = AdapterLibrary(folder, linear_layers(transformer), rank, self.dtype,
                                        pin=self.gpu is not None)
        self._adapters.refresh()
        self._adapters_looked_at = time.monotonic()
        view = lora_view(transformer, rank)
        self._slots = AdapterSlots(view, rank)
        self._lora_pipe = acceleration.pipeline_with(self._pipe, transformer=view, scheduler=self._pipe.scheduler)
        log.info("adapters: folder=%s served=%d slot_rank=%d slot_mib=%.0f", folder, len(self._adapters.infos()),
                 rank, self._slots.slot_bytes() / 2**20)

    def adapters(self) -> list[AdapterInfo]:
        """The adapters requests may name, the folder looked at again if ADAPTER_RESCAN_S has passed."""
        if self._adapters is None:
            return []
        with self._adapters_lock:
            if time.monotonic() - self._adapters_looked_at >= ADAPTER_RESCAN_S:
                self._adapters.refresh()
                self._adapters_looked_at = time.monotonic()
            return self._adapters.infos()

    def _chosen_adapters(self, valid: ValidRequest) -> list[tuple[Adapter, float]]:
        """The adapters `valid` asks for, with their strengths, or RequestError naming the one that is not served or
        the ranks that do not fit the slots (an adapter at strength 0 takes none: it changes nothing)."""
        if not valid.loras:
            return []
        available = self.adapters()
        if self._adapters is None:
            raise RequestError("This server serves no LoRA adapters (its adapter folder did not exist at start); "
                               "send the request without loras.", "loras")
        chosen = []
        for choice in valid.loras:
            adapter = self._adapters.get(choice.name)
            if adapter is None:
                names = ", ".join(info.name for info in available) or "none"
                raise RequestError(f"loras: no adapter is named {shown(choice.name)}; available: {names}.", "loras")
            chosen.append((adapter, choice.scale))
        rank = sum(adapter.info.rank for adapter, scale in chosen if scale)
        if rank > self._slots.rank:
            raise RequestError(f"loras: the adapters' ranks add up to {rank}; this server takes at most "
                               f"{self._slots.rank} at once (--lora-max-rank). Use fewer adapters.", "loras")
        return chosen

    def _on_hang(self, request_id: str, seconds: float) -> None:
        self.healthy = False
        if self._on_fatal is not None:
            self._on_fatal(TimeoutError(f"request {request_id} ran {seconds:.0f} s without finishing"), self.state())

    def stop_accepting(self) -> None:
        """From now on new requests are refused as "shutting down"; the running one goes on."""
        self._draining = True

    @property
    def running_jobs(self) -> int:
        """Requests being generated now: this engine runs one at a time."""
        return int(self.in_flight is not None)

    @property
    def pipeline(self):
        """The pipeline that serves now: the eager one, or its compiled copy once that is live."""
        return self._pipe

    def status(self) -> EngineStatus:
        """What the service is doing, for health probes and the status line."""
        return EngineStatus(ready=self.ready, healthy=self.healthy, busy=self.in_flight is not None,
                            in_flight=self.in_flight, served=self.served, attention=self.attention_backend,
                            compiled=self.compiled, serving=self.serving,
                            text_encoder="graphs" if self._prompt_encoder.graphed else "eager", device=str(self.device))

    def gpu_memory(self) -> GpuMemory | None:
        if self.gpu is None:
            return None
        free, total = torch.cuda.mem_get_info(self.gpu)
        return GpuMemory(free=free, total=total, allocated=torch.cuda.memory_allocated(self.gpu),
                         reserved=torch.cuda.memory_reserved(self.gpu))

    def state(self) -> dict[str, object]:
        """The status and the recent prompts, for crash snapshots."""
        return asdict(self.status()) | {"recent_prompts": list(self._recent_prompts)}

    def output_dir_problem(self) -> str | None:
        """Why an image could not be saved now (the directory is not writable, or the disk nearly full), or None."""
        return self._output_dir_check.problem()

    def history(self, limit: int, owner: str | None) -> list[tuple[Path, dict[str, object]]]:
        """The newest images saved for `owner` and their parameters, this process's and earlier ones'; none for no
        owner."""
        return self._recent_images.newest(limit, owner)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running or saving; False if one still is after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout=timeout)

    def warm_up(self) -> None:
        """The slow part of starting, on the GPU thread: the attention probe picks the backend, then one small
        generation proves the device works and gives a failing backend its first call. On CUDA two more sizes
        measure the memory a request needs, for the memory guard. The text encoder's CUDA graphs and compilation,
        when on, come later in the background (see start_background_work): "ready" does not wait for them."""
        started = time.perf_counter()
        with self._lock:
            self._on_gpu_thread(self._warm_up)
        self.ready = True
        log.info("warm-up done attention=%s seconds=%.2f", self.attention_backend, time.perf_counter() - started)

    def _warm_up(self) -> None:
        self.attention_backend = attention.apply_backend(self._pipe.transformer, self._attention_choice, self.device)
        if self._lora_pipe is not None:
            attention.set_backend(self._lora_pipe.transformer, self.attention_backend, self.device)
        request = _warm_up_request(256)
        try:
            self._run(request, progress=None)
        except Exception as error:
            if self.attention_backend == attention.SDPA:
                raise
            self.attention_backend = attention.fall_back_to_sdpa(self._pipe.transformer, self.attention_backend, error)
            self._run(request, progress=None)
        if self.device.type == "cuda":
            self.memory_guard = memory.measure_guard(self._memory_probe_peaks, self.device,
                                                     self.gpu_memory_limit_bytes)

    def _on_gpu_thread(self, work: Callable, *args):
        """work(*args) on the GPU thread, in the caller's context (Gradio finds its progress bar through context
        variables); its result or exception comes back here."""
        future = self._gpu_thread.submit(contextvars.copy_context().run, work, *args)
        try:
            return future.result()
        finally:
            # The future holds a failed call's exception, whose frames hold its tensors: an out-of-memory error's
            # must be gone before the memory is released.
            future = None

    def _memory_probe_peaks(self, side: int) -> tuple[int, int]:
        # A prompt of its own: a cached one would skip the text encoder, whose streamed layers are the peak in the
        # low-VRAM profile. Through the adapter slots where there are some: a request with adapters needs more.
        # An inpainting edit: its VAE encode, before the denoise, counts in the guard too.
        probe = replace(_warm_up_request(side, prompt=f"memory probe {side}"), edit=_probe_edit(side))
        run = self._run(probe, progress=None, on_slots=self._lora_pipe is not None)
        return run.denoise_peak_bytes, run.decode_peak_bytes

    def start_background_work(self, delay_s: float = 0.0) -> threading.Thread:
        """Once a request has been answered or `delay_s` has passed, whichever comes first (the first request after a
        restart should share neither the GPU nor the interpreter with this), in the background: the text encoder's
        CUDA graphs (seconds: one bucket at a time between requests), then, when on, the compiled pipeline (_compile).
        """
        thread = threading.Thread(target=self._background_work, args=(delay_s,), name="after-start", daemon=True)
        thread.start()
        return thread

    def _background_work(self, delay_s: float) -> None:
        after = "a request was answered" if self._answered.wait(timeout=delay_s) else f"{delay_s:g} s without requests"
        if self._draining:
            return
        if self._prompt_encoder.graphs_possible:
            self._capture_text_encoder_graphs()
        if self.compile_model and not self._draining:
            self._compile(after)

    def _capture_text_encoder_graphs(self) -> None:
        """The graphs on the GPU thread, each between requests. Their memory pool is taken from what the memory
        guard, measured before them, lets requests use."""
        pool_bytes = 0

        def on_gpu_thread_counting_memory(work):
            def counted():
                nonlocal pool_bytes
                before = torch.cuda.memory_reserved(self.device)
                try:
                    return work()
                finally:
                    pool_bytes += torch.cuda.memory_reserved(self.device) - before
            return self._on_gpu_thread(counted)

        self._prompt_encoder.capture_graphs(run=on_gpu_thread_counting_memory)
        if self.memory_guard is not None and pool_bytes > 0:
            self.memory_guard = replace(self.memory_guard,
                                        available_bytes=self.memory_guard.available_bytes - pool_bytes)
            log.info("memory guard: text encoder graphs hold %d MiB; available_gib=%.2f", pool_bytes // 2**20,
                     self.memory_guard.available_bytes / 2**30)

    def build_attention_plans(self, sizes: Iterable[tuple[int, int]]) -> threading.Thread | None:
        """Build, on the GPU thread, the attention plans requests at these sizes will need, one length at a time
        between requests: cuDNN's plans cost 65-70 ms each, and a new prompt's caption length needs two. None when
        the backend builds no plans."""
        if not attention.builds_plans(self.attention_backend, self.device):
            return None
        lengths = attention.dit_sequence_lengths(self._pipe, sizes, MAX_SEQUENCE_LENGTH)
        thread = threading.Thread(target=self._build_plans, args=(lengths,), name="attention-plans", daemon=True)
        thread.start()
        return thread

    def _build_plans(self, lengths: list[int]) -> None:
        started = time.perf_counter()
        config = self._pipe.transformer.config
        for built, tokens in enumerate(lengths):
            if self._draining:
                return
            try:
                self._on_gpu_thread(attention.build_plan, self.attention_backend, tokens, config.n_heads,
                                    config.dim // config.n_heads, self.device, self.dtype)
            except Exception as error:  # requests build their own plans as before: slower, not wrong
                log.warning("building attention plans stopped at tokens=%d after %d of %d (%s: %s)", tokens, built,
                            len(lengths), type(error).__name__, str(error).strip()[:200])
                return
        log.info("attention plans built lengths=%d seconds=%.1f", len(lengths), time.perf_counter() - started)

    def _room_beside_a_request(self) -> bool:
        if self.memory_guard is None:
            return True
        largest_request = self.memory_guard.need_bytes(self.limits.max_w, self.limits.max_h)
        largest_warm_up = max(self.memory_guard.need_bytes(w, h) for w, h in COMPILE_WARM_UP_SIZES)
        return largest_request + largest_warm_up <= self.memory_guard.available_bytes

    def _compile(self, after: str) -> None:
        """Compile a copy of the pipeline over the same weights, so the eager one goes on serving meanwhile, and
        swap it in once its warm-up has compiled every graph it needs. Where the GPU has no room for a warm-up
        beside the largest request (a capped card), the warm-up holds the GPU and requests wait. How long it takes,
        with a warm compile cache and a cold one: docs/PERFORMANCE.md. A failure leaves the eager pipeline serving,
        with one warning."""
        started = time.perf_counter()
        self.compiled = "compiling"
        beside = self._room_beside_a_request()
        log.info("compiling the DiT blocks and the VAE decoder (after %s); meanwhile %s", after,
                 "the eager path serves" if beside else "requests wait (no GPU memory for both at once)")
        whole_gpu = nullcontext() if beside else self._lock
        text_encoder = self._lock if beside else nullcontext()  # shared with the eager path: one caller at a time
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
        try:
            with whole_gpu:
                compiled = acceleration.compiled_copy(self._pipe, backend=self.compile_backend)
                # The adapter slots' pipeline too, its DiT a graph of its own: warmed up now, a request with
                # adapters compiles nothing once the compiled path is live. Whatever the slots hold meanwhile (a
                # request served eagerly writes them), the graph is the same.
                compiled_lora = None if self._lora_pipe is None else acceleration.compiled_copy(
                    self._lora_pipe, backend=self.compile_backend, vae=compiled.vae)
                for pipe in filter(None, (compiled, compiled_lora)):
                    for (width, height), prompt in zip(COMPILE_WARM_UP_SIZES, COMPILE_WARM_UP_PROMPTS, strict=True):
                        request = _warm_up_request(width, height, prompt)
                        with text_encoder:
                            prompt_embeds, _ = self.encode_prompt(request.prompt)
                        self._render(pipe, request, prompt_embeds, progress=None, track_memory=False)
        except Exception as error:
            self.compiled = "failed"
            log.warning("compilation failed; serving eagerly (%s: %s)", type(error).__name__, first_line(error),
                        exc_info=error)
            return
        finally:
            sys.setswitchinterval(switch_interval)
        with self._lock:
            self._pipe = compiled
            self._lora_pipe = compiled_lora or self._lora_pipe
            self.serving = "compiled"
        self.compiled = "on"
        log.info("compiled path live seconds=%.1f", time.perf_counter() - started)

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None,
                 received_at: float | None = None, owner: str | None = None,
                 on_gpu_done: Callable[[], None] | None = None) -> GenerationResult:
        """Validate → encode → denoise → decode → check → save. Bad input raises RequestError, failures
        GenerationError; either way nothing is saved and the engine stays usable. `received_at` (time.monotonic()
        when the request arrived, before any queue) lets a request that waited too long fail instead of run late.
        `owner` (an opaque id) is saved with the image: history(owner=...) lists only that owner's images.
        `on_gpu_done` is called once the GPU work is done, before the image is saved."""
        request_id = uuid.uuid4().hex[:12]
        # 1. Validate, and refuse a size the GPU has no memory for, before anything waits or runs.
        try:
            valid = validate(request, self.limits)
            adapters = self._chosen_adapters(valid)
            if self.memory_guard is not None:
                self.memory_guard.check(valid.width, valid.height)
        except RequestError as error:
            log.info("request id=%s outcome=rejected reason=%r", request_id, str(error))
            self._metrics.request_finished("rejected")
            raise
        with self._idle:
            self._active += 1
        outcome, stage_ms = "error", None
        try:
            result = self._generate(request_id, valid, adapters, progress, received_at, owner, on_gpu_done)
            outcome = "ok"
            stage_ms = result.timings.by_stage()
            return result
        except BaseException as error:
            outcome = outcome_of(error)
            raise
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
            self._metrics.request_finished(outcome, stage_ms, [choice.name for choice in valid.loras])

    def _generate(self, request_id: str, valid: ValidRequest, adapters: list[tuple[Adapter, float]],
                  progress: ProgressCallback | None, received_at: float | None, owner: str | None,
                  on_gpu_done: Callable[[], None] | None) -> GenerationResult:
        started = time.perf_counter()
        prompt_summary = summarize_prompt(valid.prompt, self.log_prompts)
        # 2. Wait for the GPU; then refuse what should not run now (stopping, nowhere to save, waited too long).
        with self._lock:
            if self._draining:
                log.info("request id=%s outcome=refused reason=shutting-down", request_id)
                raise ServiceBusy("The service is shutting down; try again in a minute.")
            # Checked here, after the wait and before the GPU work: an image that cannot be saved is GPU time lost.
            if self.output_dir_problem() is not None:
                log.info("request id=%s outcome=refused reason=output-dir-unusable", request_id)
                raise ServiceBusy(OUTPUT_DIR_UNUSABLE)
            waited_ms = (time.perf_counter() - started) * 1000
            queued_s = time.monotonic() - received_at if received_at is not None else waited_ms / 1000
            if queued_s > self.queue_timeout_s:
                log.info("request id=%s outcome=timeout queued_s=%.1f limit_s=%s", request_id, queued_s,
                         self.queue_timeout_s)
                raise ServiceBusy(f"The server is busy: your request waited {queued_s:.0f} s for the GPU "
                                      f"(the limit is {self.queue_timeout_s:.0f} s). Try again in a moment.")
            self.in_flight = request_id
            serving = self.serving
            self._started += 1
            self._recent_prompts.append(f"id={request_id} {prompt_summary}")
            self._hangs.begin(request_id)
            out_of_memory = None
            # 3-5. Encode, denoise, decode and check, on the GPU thread (_run, _render). A failure here is either
            #      the request's own (GenerationError, out of memory: the engine goes on) or the GPU's (poisoned).
            try:
                run = self._on_gpu_thread(self._run, valid, progress, self._started, adapters)
            except GenerationError as error:
                log.warning("request id=%s prompt=%s outcome=failed reason=%r", request_id, prompt_summary, str(error))
                raise
            except (torch.OutOfMemoryError, MemoryError) as error:
                log.error("request id=%s outcome=oom size=%dx%d", request_id, valid.width, valid.height,
                          exc_info=error)
                out_of_memory = "GPU memory" if isinstance(error, torch.OutOfMemoryError) else "memory"
            except Exception as error:
                if not is_poisoned_gpu_error(error):
                    raise
                self.healthy = False
                log.critical("request id=%s outcome=fatal error=%r", request_id, str(error), exc_info=error)
                if self._on_fatal is not None:
                    self._on_fatal(error, self.state())
                raise
            finally:
                self.in_flight = None
                self._hangs.end()
            if out_of_memory:
                # Only here, with the exception and its frames gone, are the request's tensors unreferenced.
                self._release_memory()
                raise GenerationError(f"Out of {out_of_memory} at {valid.width}×{valid.height}; try a smaller size.")
        # 6. Save, outside the GPU lock: the next request's GPU work overlaps this one's PNG.
        if on_gpu_done is not None:
            on_gpu_done()
        save_started = time.perf_counter()
        stem = f"{time.strftime('%H%M%S')}-{request_id}-seed{valid.seed}"
        parameters = self._parameters(request_id, valid, adapters) | ({"owner": owner} if owner else {})
        path = save_image(run.image, self.output_dir, stem, parameters, infotext=a1111_parameters(parameters),
                          output_format=valid.output_format, quality=valid.output_compression)
        self._recent_images.add(path, parameters)
        save_ms = (time.perf_counter() - save_started) * 1000
        total_ms = (time.perf_counter() - started) * 1000
        timings = StageTimings(queue_ms=waited_ms, save_ms=save_ms, total_ms=total_ms, **run.stage_ms)
        with self._idle:
            self.served += 1
        self._answered.set()
        log.info(
            "request id=%s prompt=%s size=%dx%d steps=%d seed=%d shift=%g%s%s wait_ms=%.0f encode_ms=%.0f "
            "denoise_ms=%.0f decode_ms=%.0f save_ms=%.0f total_ms=%.0f%s path=%s outcome=ok file=%s",
            request_id, prompt_summary, valid.width, valid.height, valid.steps,
            valid.seed, valid.shift, _loras_field(valid, run.adapters_ms), _edit_field(valid), waited_ms,
            timings.encode_ms,
            timings.denoise_ms, timings.decode_ms, save_ms, total_ms, self._peak_memory_field(run), serving, path,
        )
        return GenerationResult(request_id=request_id, image=run.image, path=path, request=valid, timings=timings,
                                notices=tuple(run.notices),
                                gpu_peak_bytes=max(run.denoise_peak_bytes, run.decode_peak_bytes))

    def _peak_memory_field(self, run: Rendered) -> str:
        if self.device.type != "cuda":
            return ""
        return (f" gpu_peak_allocated_mib={max(run.denoise_peak_bytes, run.decode_peak_bytes) // 2**20}"
                f" gpu_peak_reserved_mib={torch.cuda.max_memory_reserved(self.device) // 2**20}")

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            log.info("memory released gpu_allocated_mib=%d gpu_reserved_mib=%d",
                     torch.cuda.memory_allocated(self.device) // 2**20,
                     torch.cuda.memory_reserved(self.device) // 2**20)

    def _parameters(self, request_id: str, valid: ValidRequest,
                    adapters: list[tuple[Adapter, float]]) -> dict[str, object]:
        loras = [{"name": adapter.info.name, "scale": scale, "hash": adapter.info.short_hash}
                 for adapter, scale in adapters]
        # The picture and the file format are not settings to make the image again with: an edit names its
        # picture by digest, and the format is the file's own.
        chosen = {field.name: getattr(valid, field.name) for field in fields(valid)
                  if field.name not in ("edit", "output_format", "output_compression")}
        edit = {} if valid.edit is None else {"mode": valid.edit.mode, "strength": valid.edit.strength,
                                              "source_sha256": valid.edit.digest}
        return {**chosen, **edit, "loras": loras, "guidance_scale": GUIDANCE_SCALE, "model": self.model_name,
                "request_id": request_id, "scheduler": "FlowMatchEulerDiscrete"}

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def encode_prompt(self, prompt: str) -> tuple[list[torch.Tensor], list[str]]:
        """The prompt's embeddings, in the pipeline's list form, and notices for the user. Repeated prompts (new
        seeds for the same text) come from a small cache."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        encoded = self._prompt_encoder.encode(prompt)
        notices = []
        if encoded.prompt_tokens > MAX_SEQUENCE_LENGTH:
            notices.append(f"The prompt is {encoded.prompt_tokens} tokens with the chat template; only the first "
                           f"{MAX_SEQUENCE_LENGTH} were used.")
        prompt_embeds = [encoded.embeddings]
        if self._prompt_cache_size:
            self._prompt_cache[prompt] = (prompt_embeds, notices)
            if len(self._prompt_cache) > self._prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        return prompt_embeds, notices

    def _peak_bytes_since_last_call(self, track_memory: bool = True) -> int:
        """Peak allocated bytes since the previous call (0 off CUDA): each stage's own peak, for the memory guard.
        The counters are the device's: a compile warm-up beside a request leaves them to the request."""
        if not track_memory or self.device.type != "cuda":
            return 0
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def _run(self, valid: ValidRequest, progress: ProgressCallback | None, request_number: int = 0,
             adapters: Sequence[tuple[Adapter, float]] = (), on_slots: bool | None = None) -> Rendered:
        """One generation on the pipeline that serves now, or (`on_slots`; by default when the request has
        adapters at a strength other than 0) on the one over the adapter slots, which then hold them: encode the
        prompt, then render."""
        self._peak_bytes_since_last_call()
        started = self._sync()
        prompt_embeds, notices = self.encode_prompt(valid.prompt)
        encoded = self._sync()
        # An adapter at strength 0 changes nothing: a request of only those runs as one without adapters.
        active = [(adapter, scale) for adapter, scale in adapters if scale]
        adapters_ms = 0.0
        if active and self._slots.load(active):
            adapters_ms = (self._sync() - encoded) * 1000
        pipe = self._lora_pipe if (bool(active) if on_slots is None else on_slots) else self._pipe
        rendered = self._render(pipe, valid, prompt_embeds, progress, request_number)
        rendered.adapters_ms = adapters_ms
        rendered.stage_ms["encode_ms"] = (encoded - started) * 1000
        rendered.notices.extend(notices)
        return rendered

    @torch.inference_mode()
    def _render(self, pipe, valid: ValidRequest, prompt_embeds: list[torch.Tensor],
                progress: ProgressCallback | None, request_number: int = 0, track_memory: bool = True) -> Rendered:
        """Denoise → decode → check: the prompt's embeddings to an image on `pipe` (eager, or the compiled copy)."""
        # 1. Denoise. The scheduler's shift is per request; each pipeline runs one request at a time. An edit
        #    encodes its picture first and runs the last `strength` part of the schedule (pipeline/edits.py).
        started = self._sync()
        pipe.scheduler.set_shift(valid.shift)
        generator = torch.Generator(device=self.device).manual_seed(valid.seed)
        sigmas, edit = None, None
        if valid.edit is not None:
            edit = EditLatents(pipe, valid.edit, valid.width, valid.height, generator, self.device)
            sigmas = edit_sigmas(valid.steps, valid.edit.strength)
        steps = valid.steps if sigmas is None else len(sigmas)

        def on_step_end(_pipe, step, _timestep, tensors):
            latents = tensors["latents"]
            if edit is not None and edit.repaint is not None:
                latents = edit.keep_unmasked(latents, pipe.scheduler.sigmas[step + 1])
            replaced = (self._faults.at_step(step + 1, request_number, valid.prompt, latents)
                        if request_number else None)
            if progress is not None:
                progress(step + 1, steps)
            return {"latents": latents if replaced is None else replaced}

        if steps == 0:  # an edit at strength 0: the picture as the VAE gives it back
            latents = edit.picture
        else:
            start = None
            if edit is not None:
                pipe.scheduler.set_timesteps(sigmas=sigmas, device=self.device)
                start = edit.at(pipe.scheduler.sigmas[0])
            latents = pipe(
                prompt_embeds=prompt_embeds, height=valid.height, width=valid.width,
                num_inference_steps=steps, sigmas=sigmas, latents=start, guidance_scale=GUIDANCE_SCALE,
                generator=generator, output_type="latent", callback_on_step_end=on_step_end,
            ).images
        denoised = self._sync()
        denoise_peak = self._peak_bytes_since_last_call(track_memory)

        # 2. Decode, as the stock pipeline does after its loop, but turn the pixels into bytes on the GPU: the
        #    same operations as its postprocess (denormalize, then ×255 and round in float32), 4× less to copy back.
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents, return_dict=False)[0]
        if self.nan_check and not torch.isfinite(decoded).all():
            raise GenerationError("The model produced an invalid image (NaN values). Try another seed.")
        pixels = pipe.image_processor.denormalize(decoded[0]).float().mul(255).round().to(torch.uint8)
        array = pixels.permute(1, 2, 0).cpu().numpy()
        finished = self._sync()

        # 3. Refuse broken output rather than return (and save) it.
        if self.nan_check and array.max() <= BLACK_LEVEL:
            raise GenerationError("The model produced an all-black image. Try another seed or prompt.")
        return Rendered(image=Image.fromarray(array), notices=[],
                        stage_ms=dict(denoise_ms=(denoised - started) * 1000, decode_ms=(finished - denoised) * 1000),
                        denoise_peak_bytes=denoise_peak,
                        decode_peak_bytes=self._peak_bytes_since_last_call(track_memory))
