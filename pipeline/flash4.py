"""FlashAttention 4 from the locally installed `flash-attn-4` wheel, as diffusers' `flash_4_hub` attention backend.

diffusers dispatches FA4 only as a Hub kernel: `flash_4_hub` fetches it through the `kernels` package at first use,
and this service starts offline. Written by hand because no library hands a local FA4 to diffusers: the wheel's
function fills that backend's kernel slot (then diffusers finds nothing to download), and the DiT's processors are
pointed at the backend directly, since `set_attention_backend` insists on the `kernels` package it would not use.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

BACKEND = "flash_4_hub"
MIN_CAPABILITY = (9, 0)  # FA4's CuTe kernels: Hopper and Blackwell


@torch.library.custom_op("zimage::flash_attn_4", mutates_args=())
def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, softmax_scale: float | None,
               causal: bool) -> torch.Tensor:
    # One opaque op for torch.compile: FA4 JIT-compiles CuTe kernels inside an autograd.Function, which Dynamo cannot
    # trace, and the DiT's blocks compile with fullgraph=True.
    from flash_attn.cute import flash_attn_func

    out, _lse = flash_attn_func(query, key, value, softmax_scale=softmax_scale, causal=causal)
    return out


@_attention.register_fake
def _(query, key, value, softmax_scale, causal):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _kernel(*, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
            causal: bool = False) -> torch.Tensor:
    return _attention(q, k, v, softmax_scale, causal)


def unusable_reason(device: torch.device) -> str | None:
    """Why FA4 cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return "needs CUDA"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return "needs a Hopper or newer GPU"
    try:
        importlib.import_module("flash_attn.cute")
    except ImportError as error:
        return f"flash-attn-4 is not installed ({error})"
    return None


def keep_kernels_in(cache_dir: Path) -> None:
    """FA4 JIT-compiles its kernels at first call (seconds); kept on disk, a restart loads them instead. Read by
    flash_attn.cute at import, so this runs before it."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(cache_dir / "flash4"))


def install() -> None:
    """Make diffusers' `flash_4_hub` backend call the local FA4 wheel."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName

    _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB].kernel_fn = _kernel


def point_processors_at_backend(model: torch.nn.Module) -> None:
    """What `set_attention_backend(BACKEND)` does once its package checks pass."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = AttentionBackendName.FLASH_4_HUB
