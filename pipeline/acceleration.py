"""Making the loaded pipeline fast (compiled repeated blocks and VAE decoder) or small (the low-VRAM profile).

Every lever here keeps the model's math: compilation changes only rounding, and the low-VRAM profile moves the text
encoder's weights, not what it computes.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline import flash4
from pipeline.loader import LoadedPipeline, load_pipeline
from pipeline.read_ahead import ReadAhead

log = logging.getLogger("zimage.acceleration")

LOW_VRAM_TILE_PX = 512


def load_for_serving(model_dir: Path, device: torch.device, *, verify: bool, compile_cache_dir: Path | None,
                     low_vram: bool, gpu_memory_limit_gib: float, read_ahead: ReadAhead | None = None
                     ) -> LoadedPipeline:
    """The weights loaded onto `device` with the process-wide settings applied around it, the same for the service's
    own engine and for each replica's. On the GPU only: `compile_cache_dir` (None: no compiling), the memory cap,
    and the low-VRAM profile. `read_ahead`: ReadAhead.of_model(model_dir, device), or None."""
    on_gpu = device.type == "cuda"
    if on_gpu and compile_cache_dir is not None:
        use_compile_cache(compile_cache_dir)
    if on_gpu and gpu_memory_limit_gib:
        # The caching allocator itself refuses to grow past the cap: a 16 GB card can be rehearsed on a larger one.
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, gpu_memory_limit_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory))
    low_vram = on_gpu and low_vram
    loaded = load_pipeline(model_dir, device, verify=verify, text_encoder_on_cpu=low_vram, read_ahead=read_ahead)
    if low_vram:
        offload_text_encoder(loaded.pipe, device)
        log.info("low-VRAM profile: text encoder streamed from CPU memory, VAE tiling above 1024 px")
    return loaded


def use_compile_cache(cache_dir: Path) -> None:
    """Keep Inductor's compiled kernels (and Triton's, and FA4's) in `cache_dir`, so a restart reuses them instead of
    compiling again. Must run before the first compilation; the libraries read these variables when they first need
    them."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    flash4.keep_kernels_in(cache_dir)


def compiled_copy(pipe, backend: str = "inductor", vae=None):
    """A second pipeline over the same weights whose DiT blocks and VAE decoder are compiled, while `pipe` stays
    eager: the eager one serves requests while this one compiles and warms up in another thread. `vae`: an already
    compiled VAE to share instead (a second pipeline's, over another view of the DiT).

    Regional compilation, as diffusers' `compile_repeated_blocks` does it (one graph serves all the DiT's
    `_repeated_blocks`), but on shallow copies of the modules: that method compiles in place, which would send a
    request served meanwhile into the compiler too. dynamic=True gives one graph for every resolution and prompt
    length. The text encoder stays eager: compiled, each new prompt length recompiled it (8–10 s on an H100) and it
    was slower than eager on new prompts (44–140 ms vs 37 ms).

    The copy has its own scheduler, whose shift and timesteps are per request state; everything else is shared.
    The DiT's attention processors, shared too, get a rotary embedding Inductor can fuse (pipeline/rotary.py); run
    eagerly they compute it as before."""
    from pipeline.rotary import use_fusable_rotary  # imports diffusers: only once a pipeline exists

    options = dict(fullgraph=True, dynamic=True, backend=backend)
    use_fusable_rotary(pipe.transformer)
    repeated = set(pipe.transformer._repeated_blocks)
    transformer = _copy_compiling(pipe.transformer, lambda module: type(module).__name__ in repeated, options)
    if vae is None:
        vae = _copy_compiling(pipe.vae, lambda module: module is pipe.vae.decoder, options)
    return pipeline_with(pipe, transformer=transformer, vae=vae)


def pipeline_with(pipe, *, transformer=None, vae=None, scheduler=None):
    """A pipeline of `pipe`'s components, `transformer` and `vae` in place of its own where given, with a scheduler
    of its own (its shift and timesteps are per-request state) unless `scheduler` is given."""
    scheduler = scheduler or type(pipe.scheduler).from_config(pipe.scheduler.config)
    made = type(pipe)(scheduler=scheduler, vae=vae or pipe.vae, text_encoder=pipe.text_encoder,
                      tokenizer=pipe.tokenizer, transformer=transformer or pipe.transformer)
    made.set_progress_bar_config(disable=True)
    return made


def _copy_compiling(module: torch.nn.Module, pick: Callable[[torch.nn.Module], bool], options: dict[str, object]):
    """`module`, or a shallow copy of it in which every submodule `pick` chooses is a compiled shallow copy.
    Parameters and untouched submodules are shared; only the modules on the way to a picked one are copied."""
    if pick(module):
        clone = copy.copy(module)
        clone.compile(**options)
        return clone
    replaced = {}
    for name, child in module.named_children():
        copied = _copy_compiling(child, pick, options)
        if copied is not child:
            replaced[name] = copied
    if not replaced:
        return module
    clone = copy.copy(module)
    clone.__dict__["_modules"] = {**module._modules, **replaced}  # copy.copy shares the original's dict
    return clone


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
