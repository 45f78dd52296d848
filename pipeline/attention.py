"""Choosing a diffusers attention backend for the DiT: the fastest usable one, PyTorch SDPA as the floor."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable

import torch

from pipeline import flash4
from pipeline.messages import StartupError, first_line

log = logging.getLogger("zimage.attention")

SDPA = "native"  # diffusers' name for torch.nn.functional.scaled_dot_product_attention

# Our flag values → diffusers backend names. FA4 (Hopper and newer, pipeline/flash4.py), FA3 (Hopper) and FA2 need
# their packages. Not diffusers' _native_cudnn and _native_flash: they pin PyTorch's SDPA kernel with `sdpa_kernel`,
# whose switches are process-wide, and the compile thread runs beside requests. With _native_cudnn chosen on an H100,
# the VAE's attention (head size 512, no cuDNN kernel) in the other thread found every other kernel switched off: "No
# available kernel", a failed compile and a 500. "native" reaches the same cuDNN kernel by PyTorch's own heuristics
# (0.54-0.71 ms at 1024²).
_CANDIDATES = {
    "auto": [flash4.BACKEND, "_flash_3", "flash", SDPA],
    "sdpa": [SDPA],
    "flash": [flash4.BACKEND, "_flash_3", "flash", SDPA],
    "xformers": ["xformers", SDPA],
}
PROBE_TOKENS = 4096 + 32  # a 1024² image (64 × 64 patches) and a short prompt: the shape that matters most
PROBE_ROUNDS = 5
PROBE_CALLS = 10
# A faster backend is kept only if its output at the probe's shape is SDPA's within this relative norm. Two correct
# bf16 kernels differ by well under 1 % on one call; a wrong one (a layout or scale mix-up) by tens of percent.
MATCH_TOLERANCE = 0.02
# Backends that may run through cuDNN's attention ("native" picks it by heuristics on Hopper). cuDNN builds an
# execution plan for every sequence length, and PyTorch caches plans per thread: on an H100 a call at a length not
# yet seen on that thread took 65-70 ms instead of 0.8 ms. A new prompt usually brings a new caption length, so
# twice per request.
PLANNED_BACKENDS = (SDPA,)


class AttentionError(StartupError):
    """No attention backend works on this machine."""


def candidates(choice: str, device_type: str) -> list[str]:
    if device_type != "cuda" and choice == "auto":
        return [SDPA]
    return _CANDIDATES[choice]


def time_backend(name: str, heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """Milliseconds per attention call through diffusers' dispatcher with backend `name` (the median of
    PROBE_ROUNDS rounds of PROBE_CALLS calls queued back to back, as the DiT queues them: a kernel whose launch costs
    more host time, as FA4's does, is not penalised for a sync the DiT never makes), and its output on fixed inputs
    (the same for every backend)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (torch.randn(1, PROBE_TOKENS, heads, head_dim, device=device, dtype=dtype,
                                     generator=generator) for _ in range(3))
    output = dispatch_attention_fn(query, key, value, backend=name)  # loads (for FA4: JIT-compiles) the kernel
    rounds = []
    for _ in range(PROBE_ROUNDS):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(PROBE_CALLS):
            dispatch_attention_fn(query, key, value, backend=name)
        torch.cuda.synchronize(device)
        rounds.append((time.perf_counter() - started) * 1000 / PROBE_CALLS)
    return statistics.median(rounds), output


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


def set_backend(transformer, name: str, device: torch.device) -> None:
    """Point the DiT's attention at diffusers backend `name`; raises when it is not usable here."""
    if name != flash4.BACKEND:
        transformer.set_attention_backend(name)
        return
    reason = flash4.unusable_reason(device)
    if reason:
        raise RuntimeError(reason)
    flash4.install()
    flash4.point_processors_at_backend(transformer)


def apply_backend(transformer, choice: str, device: torch.device) -> str:
    """Set the backend for `choice` and return its diffusers name. Among several usable ones (on CUDA), a quick probe
    at the DiT's own head shape picks the fastest whose output matches SDPA's; one that is missing, fails the probe
    or differs is skipped."""
    reasons, usable = [], []
    for name in candidates(choice, device.type):
        try:
            set_backend(transformer, name, device)
        except (RuntimeError, ValueError, ImportError) as error:
            reasons.append(f"{name}: {error}")
            continue
        usable.append(name)
    if not usable:
        raise AttentionError(f"no attention backend is usable: {'; '.join(reasons)}")
    chosen = usable[0]
    if device.type == "cuda" and len(usable) > 1:
        chosen = _probe(transformer, usable, device, reasons)
    if chosen == SDPA and choice not in ("auto", "sdpa"):
        log.warning("attention=%s is not usable or not faster here (%s); using sdpa", choice,
                    "; ".join(reasons) or "sdpa was fastest")
    elif reasons:
        log.info("attention backends not usable here: %s", "; ".join(reasons))
    set_backend(transformer, chosen, device)
    return chosen


def _probe(transformer, usable: list[str], device: torch.device, reasons: list[str]) -> str:
    heads = transformer.config.n_heads
    head_dim = transformer.config.dim // heads
    timings, outputs = {}, {}
    for name in usable:
        try:
            timings[name], outputs[name] = time_backend(name, heads, head_dim, device, transformer.dtype)
        except Exception as error:  # a kernel that does not run here is simply not a candidate
            reasons.append(f"{name}: {type(error).__name__}: {str(error).strip()[:120]}")
    differences = {name: relative_difference(output, outputs[SDPA])
                   for name, output in outputs.items() if SDPA in outputs and name != SDPA}
    for name, difference in differences.items():
        if difference > MATCH_TOLERANCE:
            reasons.append(f"{name}: output differs from sdpa's by {difference:.3f}")
            del timings[name]
    chosen = min(timings, key=timings.get) if timings else SDPA
    log.info("attention probe tokens=%d %s chosen=%s", PROBE_TOKENS,
             " ".join(f"{name}_ms={ms:.3f}" for name, ms in timings.items()), chosen)
    if differences:
        log.info("attention probe difference_from_sdpa %s",
                 " ".join(f"{name}={difference:.4f}" for name, difference in differences.items()))
    return chosen


def fall_back_to_sdpa(transformer, failed: str, error: BaseException) -> str:
    """After a backend failed its first real call: one warning line, then SDPA."""
    log.warning("attention backend=%s failed its first call (%s: %s); falling back to sdpa",
                failed, type(error).__name__, first_line(error))
    transformer.set_attention_backend(SDPA)
    return SDPA


def builds_plans(backend: str, device: torch.device) -> bool:
    return device.type == "cuda" and backend in PLANNED_BACKENDS


def dit_sequence_lengths(pipe, sizes: Iterable[tuple[int, int]], max_caption_tokens: int) -> list[int]:
    """Every sequence length the DiT's attention meets at these (width, height) sizes, in order of first need:
    the image tokens alone (noise refiner), the caption alone (context refiner) and both (the main blocks), each
    padded by diffusers to a multiple of its SEQ_MULTI_OF."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    def padded(tokens: int) -> int:
        return tokens + (-tokens) % SEQ_MULTI_OF

    patch_pixels = pipe.vae_scale_factor * pipe.transformer.config.all_patch_size[0]
    captions = range(SEQ_MULTI_OF, padded(max_caption_tokens) + 1, SEQ_MULTI_OF)
    lengths = dict.fromkeys(captions)
    for width, height in sizes:
        image = padded((width // patch_pixels) * (height // patch_pixels))
        lengths.update(dict.fromkeys([image, *(image + caption for caption in captions)]))
    return list(lengths)


def build_plan(backend: str, tokens: int, heads: int, head_dim: int, device: torch.device,
               dtype: torch.dtype) -> None:
    """One attention call at `tokens`, as the DiT makes it: the calling thread keeps the plan cuDNN builds for it."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    query = torch.zeros(1, tokens, heads, head_dim, device=device, dtype=dtype)
    dispatch_attention_fn(query, query, query, backend=backend)
