"""Making the loaded pipeline fast (compiled repeated blocks and VAE decoder) or small (the low-VRAM profile).

Every lever here keeps the model's math: compilation changes only rounding, and the low-VRAM profile moves the text
encoder's weights, not what it computes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("zimage.acceleration")

LOW_VRAM_TILE_PX = 512


def use_compile_cache(cache_dir: Path) -> None:
    """Keep Inductor's compiled kernels (and Triton's) in `cache_dir`, so a restart reuses them instead of compiling
    again. Must run before the first compilation; both libraries read these variables when they first need them."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")


def compile_pipeline(pipe) -> None:
    """Regional compilation: the DiT's repeated transformer blocks (one compiled graph serves all of them), the VAE
    decoder and, where it lives on the GPU, the text encoder's decoder layers. dynamic=True gives one graph for every
    resolution and prompt length instead of a new compile per shape."""
    pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    pipe.vae.decoder.compile(fullgraph=True, dynamic=True)
    if next(pipe.text_encoder.parameters()).device.type != "cpu":  # streamed (low-VRAM) layers stay eager
        # transformers has no compile_repeated_blocks; this is the same regional idea for its 36 layers, which
        # eagerly spend more time launching small kernels than computing for a prompt of a few dozen tokens.
        # An encoder pass needs no KV cache, and filling one makes every layer's graph differ (one recompile per
        # layer until the recompile limit).
        pipe.text_encoder.config.use_cache = False
        for layer in pipe.text_encoder.layers:
            layer.compile(dynamic=True)


def offload_text_encoder(pipe, device: torch.device) -> None:
    """Low-VRAM profile: the text encoder's weights live in (pinned) CPU memory and stream to the GPU one decoder
    layer at a time, on a side stream that overlaps the copy of the next layer with the compute of this one."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(pipe.text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    # The VAE decodes in overlapping 512-px tiles: its full-frame activations and cuDNN workspaces at 1024² do not
    # fit beside the DiT in 16 GB. Tile seams are blended, so the image differs slightly from a full-frame decode.
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size = LOW_VRAM_TILE_PX
    pipe.vae.tile_latent_min_size = LOW_VRAM_TILE_PX // 8
