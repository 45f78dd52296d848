"""Levers measured on the GPU and not taken (docs/PERFORMANCE.md says why): the DiT's forward replayed from a CUDA
graph per shape, the VAE decoder in channels-last memory, and Inductor's tuning settings for the DiT blocks.

    PYTHONPATH=. python scripts/bench_levers.py /data/random-full     # a weights dir, layout A or B (CUDA)

Prints the denoise time (8 steps, the pipeline's own loop) of the compiled DiT as the engine serves it against the
same DiT replayed from graphs captured per (image, caption) shape, at 1024², 512² and 1536²: the first request of a
shape (the capture's cost) and the median of 6 after it, and whether the latents match. Then the VAE decode with the
engine's postprocess (pixels as bytes on the GPU, copied back) at four sizes: eager and compiled (`dynamic=True`, as
the engine compiles it), each in the default and the channels-last memory format, against eager's output. Last,
the compiled denoise at 1024² and 1536² (median of 6) with Inductor's defaults, `coordinate_descent_tuning`, and
`max_autotune_gemm` (Triton GEMM templates autotuned against cuBLAS), each compiled afresh.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch._inductor.config

import pipeline  # noqa: F401  (offline flags before the HF imports)
from pipeline.acceleration import compiled_copy, load_for_serving

CAPTION_TOKENS = 67
WARM_UP_SIZES = ((768, 512), (1024, 1024), (256, 256))  # as the engine's compile warm-up
DENOISE_SIZES = ((1024, 1024), (512, 512), (1536, 1536))
DECODE_LATENTS = ((128, 128), (192, 192), (144, 256), (64, 64))  # 1024², 1536², 2048×1152, 512²


class GraphedTransformer(torch.nn.Module):
    """The DiT's forward captured once per (latent shape, caption length) and replayed after: the shape's masks and
    positions are baked into its graph, so a new caption length needs its own."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.graphs: dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs never run at the same time

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)  # dtype, config, in_channels: what the pipeline reads of its DiT

    def forward(self, latents: list[torch.Tensor], timestep: torch.Tensor, captions: list[torch.Tensor], **_):
        key = (tuple(latents[0].shape), tuple(captions[0].shape))
        if key not in self.graphs:
            inputs = ([latents[0].clone()], timestep.clone(), [captions[0].clone()])
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.inner(*inputs, return_dict=False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.inner(*inputs, return_dict=False)[0]
            self.graphs[key] = (graph, inputs, output)
        graph, (static_latents, static_timestep, static_captions), output = self.graphs[key]
        static_latents[0].copy_(latents[0])
        static_timestep.copy_(timestep)
        static_captions[0].copy_(captions[0])
        graph.replay()
        return (output,)


def denoise_ms(pipe, width: int, height: int, embeddings: torch.Tensor, seed: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    latents = pipe(prompt_embeds=[embeddings], height=height, width=width, num_inference_steps=8,
                   guidance_scale=0.0, generator=torch.Generator("cuda").manual_seed(seed),
                   output_type="latent").images
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000, latents


def relative(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.float() - reference.float()).norm() / reference.float().norm())


def bench_dit_graphs(pipe) -> None:
    compiled = compiled_copy(pipe)
    caption = lambda: torch.randn(CAPTION_TOKENS, 2560, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    for width, height in WARM_UP_SIZES:
        denoise_ms(compiled, width, height, caption(), 0)
    graphed = type(compiled)(**compiled.components)
    graphed.transformer = GraphedTransformer(compiled.transformer)
    graphed.set_progress_bar_config(disable=True)
    for width, height in DENOISE_SIZES:
        for name, variant in (("compiled", compiled), ("compiled + CUDA graph", graphed)):
            first, _ = denoise_ms(variant, width, height, caption(), 0)
            times = [denoise_ms(variant, width, height, caption(), seed)[0] for seed in range(1, 7)]
            print(f"denoise {width}x{height} {name:22s} first {first:7.1f} ms  median {statistics.median(times):7.1f}"
                  f" ms", flush=True)
        same = caption()
        difference = relative(denoise_ms(graphed, width, height, same, 9)[1],
                              denoise_ms(compiled, width, height, same, 9)[1])
        print(f"    latents, graph vs not: relative difference {difference:.5f}", flush=True)


def decode_ms(decoder, latents: torch.Tensor, channels_last: bool) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    decoded = decoder(latents)
    pixels = (decoded[0] / 2 + 0.5).clamp(0, 1).float().mul(255).round().to(torch.uint8)
    pixels.permute(1, 2, 0).cpu()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000, decoded


def bench_vae_memory_format(vae) -> None:
    latents = [torch.randn(1, 16, *shape, device="cuda", dtype=torch.bfloat16) for shape in DECODE_LATENTS]
    reference = [decode_ms(vae.decoder, z, False)[1] for z in latents]
    for compiled in (False, True):
        for channels_last in (False, True):
            torch._dynamo.reset()
            vae.decoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            decoder = copy.copy(vae.decoder)
            if compiled:
                decoder.compile(fullgraph=True, dynamic=True)
                decode_ms(decoder, torch.randn(1, 16, 96, 64, device="cuda", dtype=torch.bfloat16), channels_last)
            cells = []
            for z, expected in zip(latents, reference):
                for _ in range(2):
                    decode_ms(decoder, z, channels_last)
                times = [decode_ms(decoder, z, channels_last)[0] for _ in range(10)]
                height, width = (side * 8 for side in z.shape[2:])
                cells.append(f"{width}x{height} {statistics.median(times):6.1f} ms "
                             f"(rel {relative(decode_ms(decoder, z, channels_last)[1], expected):.4f})")
            name = f"{'compiled' if compiled else 'eager'}, {'channels-last' if channels_last else 'default'}"
            print(f"decode {name:26s} " + "  ".join(cells), flush=True)
    vae.decoder.to(memory_format=torch.contiguous_format)


INDUCTOR_SETTINGS = (("defaults", {}), ("coordinate_descent_tuning", {"coordinate_descent_tuning": True}),
                     ("max_autotune_gemm", {"max_autotune_gemm": True, "coordinate_descent_tuning": True}))


def bench_inductor_settings(pipe) -> None:
    caption = lambda: torch.randn(CAPTION_TOKENS, 2560, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    for name, settings in INDUCTOR_SETTINGS:
        torch._dynamo.reset()
        started = time.perf_counter()
        with torch._inductor.config.patch(settings):  # read when each graph compiles: during the warm-up
            compiled = compiled_copy(pipe)
            for width, height in WARM_UP_SIZES:
                denoise_ms(compiled, width, height, caption(), 0)
        compile_s = time.perf_counter() - started
        for width, height in DENOISE_SIZES[::2]:
            times = [denoise_ms(compiled, width, height, caption(), seed)[0] for seed in range(6)]
            print(f"inductor {name:26s} compile + warm-up {compile_s:5.1f} s  {width}x{height} median "
                  f"{statistics.median(times):7.1f} ms", flush=True)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="weights dir, layout A or B")
    parser.add_argument("--compile-cache-dir", type=Path, default=Path("/tmp/cc"),
                        help="Inductor's cache, as the service's --compile-cache-dir")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("these levers are GPU-only: run it on a CUDA machine")
    pipe = load_for_serving(args.model_dir, torch.device("cuda"), verify=False,
                            compile_cache_dir=args.compile_cache_dir, low_vram=False, gpu_memory_limit_gib=0).pipe
    pipe.set_progress_bar_config(disable=True)
    bench_dit_graphs(pipe)
    bench_vae_memory_format(pipe.vae)
    bench_inductor_settings(pipe)


if __name__ == "__main__":
    main()
