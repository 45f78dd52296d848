"""Where the compiled pipeline spends GPU time: one 1024² request's denoise (8 steps) and decode, kernel by kernel.

    PYTHONPATH=. python scripts/profile_denoise.py                  # full-size random bf16 weights, built on the GPU
    PYTHONPATH=. python scripts/profile_denoise.py --stock-rotary   # with diffusers' complex-number rotary embedding
    PYTHONPATH=. python scripts/profile_denoise.py --inductor-rotary   # real arithmetic, fused by Inductor, no kernel

Compiles as the engine does (`acceleration.compiled_copy`, the engine's warm-up sizes), then prints the denoise and
decode times (median of 6, a new caption each) and, from torch.profiler over one more request, the GPU time per
kernel family (matrix products, attention, Inductor's fused kernels, other eager kernels) and the kernels that took
the most. The rotary embedding's formulation decides whether the query/key norm, the rotation and the cast back to
bf16 are one fused kernel or five (a float32 copy, an eager complex multiply, a copy back), and whether that kernel
is Inductor's or pipeline/rotary_kernel.py's: compare the three runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import pipeline  # noqa: F401  (offline flags before the HF imports)
from pipeline import attention, rotary
from pipeline.acceleration import compiled_copy
from pipeline.engine import COMPILE_WARM_UP_SIZES
from pipeline.random_model import FULL_SIZE, build_components

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_levers import CAPTION_TOKENS, decode_ms, denoise_ms  # noqa: E402

SIZE = 1024
FAMILIES = (  # first match wins; names as CUDA reports them (a fused kernel's name lists the ops it took in)
    ("Inductor fused", ("triton",)),
    ("attention", ("sdpa", "fmha", "flash_fprop", "flash_attn")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
)


def family(kernel: str) -> str:
    lowered = kernel.lower()
    return next((name for name, marks in FAMILIES if any(mark in lowered for mark in marks)), "other")


def caption() -> torch.Tensor:
    return torch.randn(CAPTION_TOKENS, 2560, device="cuda", dtype=torch.bfloat16)


def request(pipe, embeddings: torch.Tensor, seed: int) -> tuple[float, float, torch.Tensor]:
    """(denoise ms, decode ms, latents) of one request at SIZE²."""
    denoise, latents = denoise_ms(pipe, SIZE, SIZE, embeddings, seed)
    decode, _ = decode_ms(pipe.vae.decoder, latents.to(pipe.vae.dtype), channels_last=False)
    return denoise, decode, latents


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock-rotary", action="store_true", help="keep diffusers' complex-number rotary embedding")
    parser.add_argument("--inductor-rotary", action="store_true",
                        help="the real-arithmetic rotation fused by Inductor instead of the hand-written kernel")
    parser.add_argument("--top", type=int, default=25, help="how many kernels to list")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this profiles GPU kernels: run it on a CUDA machine")
    from diffusers import ZImagePipeline

    device = torch.device("cuda")
    pipe = ZImagePipeline(**build_components(FULL_SIZE, device))
    pipe.set_progress_bar_config(disable=True)
    backend = attention.apply_backend(pipe.transformer, "auto", device)
    started = time.perf_counter()
    compiled = compiled_copy(pipe)
    rotary.FusableRotaryProcessor.use_kernel = not args.inductor_rotary
    if args.stock_rotary:  # undo what compiled_copy applied, before the first call, which compiles
        from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

        rotary.replace_processors(pipe.transformer, rotary.FusableRotaryProcessor, ZSingleStreamAttnProcessor)
    for (width, height), tokens in zip(COMPILE_WARM_UP_SIZES, (CAPTION_TOKENS, 100, 20), strict=True):
        compiled(prompt_embeds=[torch.randn(tokens, 2560, device="cuda", dtype=torch.bfloat16)], height=height,
                 width=width, num_inference_steps=1, guidance_scale=0.0, output_type="pil")
    print(f"rotary={'stock' if args.stock_rotary else 'fusable'} attention={backend} "
          f"compile + warm-up {time.perf_counter() - started:.1f} s", flush=True)

    same = caption()
    _, _, eager_latents = request(pipe, same, 5)
    _, _, compiled_latents = request(compiled, same, 5)
    difference = float((compiled_latents - eager_latents).float().norm() / eager_latents.float().norm())
    times = [request(compiled, caption(), seed)[:2] for seed in range(6)]
    print(f"{SIZE}² compiled: denoise median {statistics.median(t[0] for t in times):.1f} ms "
          f"({', '.join(f'{t[0]:.1f}' for t in times)}), decode median {statistics.median(t[1] for t in times):.1f} ms;"
          f" latents vs eager: relative difference {difference:.4f}", flush=True)

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        request(compiled, caption(), 7)
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for event in trace.events():
        if event.device_type == DeviceType.CUDA:
            per_kernel[event.name].append(event.device_time_total / 1000)
    by_family: dict[str, float] = defaultdict(float)
    for kernel, spans in per_kernel.items():
        by_family[family(kernel)] += sum(spans)
    total = sum(by_family.values())
    print(f"GPU time in one request (denoise + decode): {total:.1f} ms")
    for name, ms in sorted(by_family.items(), key=lambda item: -item[1]):
        print(f"  {name:16s} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
    print(f"the {args.top} kernels that took the most:")
    for kernel, spans in sorted(per_kernel.items(), key=lambda item: -sum(item[1]))[:args.top]:
        print(f"  {sum(spans):8.2f} ms  {len(spans):5d} calls  {family(kernel):16s} {kernel[:110]}")


if __name__ == "__main__":
    main()
