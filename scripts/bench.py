"""Stock diffusers ZImagePipeline vs. this service's engine, in one process on one CUDA GPU.

    PYTHONPATH=. python scripts/bench.py --random-weights --json bench.json        # full-size, random bf16 weights
    PYTHONPATH=. python scripts/bench.py --model-dir /opt/z-image-turbo/weights    # the real files
    PYTHONPATH=. python scripts/bench.py --random-weights --low-vram               # the 16 GB profile alone
    PYTHONPATH=. python scripts/bench.py --random-weights --no-compile --sizes 1024x1024 --oom-check  # + a real OOM

Stock runs first, exactly as shipped (prompt padded to 512 tokens, default attention, eager). Then the same modules
get the engine's levers one at a time, each timed before and after: unpadded prompt, the attention probe's
choice, compiled DiT blocks, compiled VAE decoder, and pixels made on the GPU; for CUDA graphs and fused projections
it measures the most they could win (GPU idle time in the loop; separate vs fused GEMMs). Reported: end-to-end time per
image (prompt → PIL image; median of --runs after warm-up) at several sizes, stage times, peak memory, counted
FLOPs and the compute bound at a measured matmul rate, the speed-up, and how far our output is from stock's
for the same seed (latents: max abs difference; image: PSNR).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import pipeline  # noqa: F401  (offline flags before the HF imports)
from pipeline import acceleration, attention
from pipeline.engine import Engine
from pipeline.loader import LoadedPipeline, load_pipeline
from pipeline.random_model import FULL_SIZE, build_components
from pipeline.requests import GenerationRequest
from pipeline.storage import save_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app import engine_options  # noqa: E402
from config import load_settings  # noqa: E402
from local_service import report  # noqa: E402

PROMPT = "一只戴着红色围巾的橘猫坐在雪地里, a ginger cat in a red scarf sitting in the snow, photo, 85mm"
SIZES = [(512, 512), (768, 768), (1024, 1024), (1280, 1280), (1536, 1536), (2048, 1152)]
HEADLINE = (1024, 1024)
STEPS = 8
SEED = 1


def sync_ms(function, runs: int) -> tuple[float, object]:
    """Median wall milliseconds of `function()` over `runs` calls after one untimed call, and its last result."""
    result = function()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1), result


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = sync_ms(lambda: [a @ b for _ in range(20)], 3)
    return 20 * 2 * 8192**3 / (ms / 1000) / 1e12


def counted_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def peak_memory(function) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return (round(torch.cuda.max_memory_allocated() / 2**30, 2), round(torch.cuda.max_memory_reserved() / 2**30, 2))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else round(10 * math.log10(255**2 / mse), 2)


class Stock:
    """The shipped pipeline's own calls, split into its stages."""

    def __init__(self, pipe):
        self.pipe = pipe

    def generator(self):
        return torch.Generator("cuda").manual_seed(SEED)

    @torch.inference_mode()
    def image(self, width: int, height: int):
        return self.pipe(PROMPT, width=width, height=height, num_inference_steps=STEPS, guidance_scale=0.0,
                         generator=self.generator()).images[0]

    @torch.inference_mode()
    def encode(self, max_sequence_length: int = 512):
        return self.pipe.encode_prompt(PROMPT, device="cuda", do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length)[0]

    @torch.inference_mode()
    def latents(self, embeds, width: int, height: int, steps: int = STEPS):
        return self.pipe(prompt_embeds=embeds, width=width, height=height, num_inference_steps=steps,
                         guidance_scale=0.0, generator=self.generator(), output_type="latent").images

    @torch.inference_mode()
    def decode_to_pil(self, latents):
        vae = self.pipe.vae
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor,
                             return_dict=False)[0]
        return self.pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def stage_table(stock: Stock, width: int, height: int, runs: int, encode_length: int = 512) -> dict[str, float]:
    encode_ms, embeds = sync_ms(lambda: stock.encode(encode_length), runs)
    denoise_ms, latents = sync_ms(lambda: stock.latents(embeds, width, height), runs)
    decode_ms, image = sync_ms(lambda: stock.decode_to_pil(latents), runs)
    with tempfile.TemporaryDirectory() as folder:
        png_ms, _ = sync_ms(lambda: save_image(image, Path(folder), "bench", {"seed": SEED}), runs)
    return {"text_encode_ms": encode_ms, "dit_step_ms": round(denoise_ms / STEPS, 1), "denoise_ms": denoise_ms,
            "vae_decode_to_pil_ms": decode_ms, "png_save_ms": png_ms}


def measure_stock(stock: Stock, sizes, runs: int, size_runs: int) -> dict[str, object]:
    figures = {"end_to_end_ms": {}, "peak_gib": {}}
    for width, height in sizes:
        key = f"{width}x{height}"
        one_image = functools.partial(stock.image, width, height)
        figures["end_to_end_ms"][key], _ = sync_ms(one_image, runs if (width, height) == HEADLINE else size_runs)
        figures["peak_gib"][key] = peak_memory(one_image)
        print(f"stock {key}: {figures['end_to_end_ms'][key]} ms", flush=True)
    figures["stages_1024"] = stage_table(stock, *HEADLINE, runs)
    return figures


def count_flops(stock: Stock, tokens: int) -> dict[str, float]:
    embeds = stock.encode(tokens)
    latents = stock.latents(embeds, *HEADLINE)
    text_encoder = stock.pipe.text_encoder
    # Qwen3's grouped-query SDPA call is one the FLOP counter cannot size; the eager attention it falls back to is
    # the same math written as matmuls, which it can.
    text_encoder.set_attn_implementation("eager")
    text_flops = {"text_encode_unpadded_tflop": counted_flops(lambda: stock.encode(tokens)) / 1e12,
                  "text_encode_padded_512_tflop": counted_flops(lambda: stock.encode(512)) / 1e12}
    text_encoder.set_attn_implementation("sdpa")
    return {
        **text_flops,
        "dit_step_tflop": counted_flops(lambda: stock.latents(embeds, *HEADLINE, steps=1)) / 1e12,
        "vae_decode_tflop": counted_flops(lambda: stock.decode_to_pil(latents)) / 1e12,
    }


def attention_lever(stock: Stock, pipe, embeds, runs: int) -> dict[str, float]:
    """DiT step time at 1024², eager, with each attention backend that runs here."""
    step_ms = {}
    for name in attention.candidates("auto", "cuda"):
        try:
            attention.set_backend(pipe.transformer, name, pipe.transformer.device)
            ms, _ = sync_ms(functools.partial(stock.latents, embeds, *HEADLINE, steps=1), runs)
        except Exception as error:
            print(f"attention {name}: not usable ({type(error).__name__}: {str(error)[:100]})", flush=True)
            continue
        step_ms[name] = ms
    pipe.transformer.set_attention_backend(attention.SDPA)
    return step_ms


def gpu_idle_in_denoise(stock: Stock, embeds, width: int, height: int) -> dict[str, float]:
    """The most CUDA graphs could win: the time the GPU sits idle during the denoising loop (wall time minus the time
    covered by at least one kernel or copy, per step). A graph replay removes launch gaps, nothing else. Profiling
    slows the CPU side, so this over-states the gaps: an upper bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    stock.latents(embeds, width, height)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        started = time.perf_counter()
        stock.latents(embeds, width, height)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1000
    spans = sorted((event.time_range.start, event.time_range.end) for event in trace.events()
                   if event.device_type == DeviceType.CUDA)
    busy_us, covered_until = 0.0, -math.inf
    for start, end in spans:  # the union of the spans: kernels on side streams may overlap
        busy_us += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    return {"wall_ms_per_step": round(wall_ms / STEPS, 2), "gpu_busy_ms_per_step": round(busy_us / 1000 / STEPS, 2),
            "idle_ms_per_step": round((wall_ms - busy_us / 1000) / STEPS, 2)}


def fused_projections_ceiling(transformer, tokens: int) -> dict[str, float]:
    """What fusing the projections that read the same input could win: per DiT layer, q/k/v as three GEMMs vs one,
    and the feed-forward's w1/w3 as two vs one, timed on the model's own weights at the step's token count."""
    repeats = 50
    layer = transformer.layers[0]
    attention_module, feed_forward = layer.attention, layer.feed_forward
    x = torch.randn(1, tokens, transformer.config.dim, device="cuda", dtype=torch.bfloat16)
    qkv = torch.cat([attention_module.to_q.weight, attention_module.to_k.weight, attention_module.to_v.weight])
    w13 = torch.cat([feed_forward.w1.weight, feed_forward.w3.weight])

    def per_call_ms(function) -> float:
        ms, _ = sync_ms(lambda: [function() for _ in range(repeats)], 5)
        return ms / repeats

    with torch.inference_mode():
        times = {
            "qkv_separate_ms": per_call_ms(lambda: (attention_module.to_q(x), attention_module.to_k(x),
                                                    attention_module.to_v(x))),
            "qkv_fused_ms": per_call_ms(lambda: torch.nn.functional.linear(x, qkv)),
            "w1_w3_separate_ms": per_call_ms(lambda: (feed_forward.w1(x), feed_forward.w3(x))),
            "w1_w3_fused_ms": per_call_ms(lambda: torch.nn.functional.linear(x, w13)),
        }
    saved = (times["qkv_separate_ms"] - times["qkv_fused_ms"]) + (times["w1_w3_separate_ms"] - times["w1_w3_fused_ms"])
    return {**{key: round(value, 3) for key, value in times.items()}, "tokens": tokens,
            "layers": len(transformer.layers), "saving_ms_per_step": round(saved * len(transformer.layers), 2)}


def build_pipe(args) -> LoadedPipeline:
    from diffusers import ZImagePipeline

    device = torch.device("cuda")
    if args.model_dir:
        return load_pipeline(args.model_dir, device, text_encoder_on_cpu=args.low_vram)
    components = build_components(FULL_SIZE, device)
    if args.low_vram:
        components["text_encoder"].to("cpu")
        torch.cuda.empty_cache()
    return LoadedPipeline(pipe=ZImagePipeline(**components), source="random full-size weights", device=device,
                          dtype=torch.bfloat16)


def engine_figures(engine: Engine, sizes, runs: int, size_runs: int) -> dict[str, object]:
    """Per size: time, peak memory, and the memory guard's estimate beside the need it estimates (peak above the
    idle model)."""
    figures = {"end_to_end_ms": {}, "with_png_save_ms": {}, "peak_gib": {}, "stages_1024": {}, "memory_guard": {}}
    idle = torch.cuda.memory_allocated()
    for width, height in sizes:
        key = f"{width}x{height}"
        request = GenerationRequest(PROMPT, width=width, height=height, steps=STEPS, seed=SEED)
        engine.generate(request)
        results = []
        for _ in range(runs if (width, height) == HEADLINE else size_runs):
            torch.cuda.reset_peak_memory_stats()  # the reserved peak; the engine tracks the allocated one itself
            results.append(engine.generate(request))
        peak = max(result.gpu_peak_bytes for result in results)
        figures["peak_gib"][key] = (round(peak / 2**30, 2), round(torch.cuda.max_memory_reserved() / 2**30, 2))
        estimate = engine.memory_guard.need_bytes(width, height)
        figures["memory_guard"][key] = {"estimate_gib": round(estimate / 2**30, 2),
                                        "measured_gib": round((peak - idle) / 2**30, 2),
                                        "estimate_over_measured": round(estimate / (peak - idle), 2)}
        figures["end_to_end_ms"][key] = round(statistics.median(r.timings.total_ms - r.timings.save_ms
                                                                for r in results), 1)
        figures["with_png_save_ms"][key] = round(statistics.median(r.timings.total_ms for r in results), 1)
        if (width, height) == HEADLINE:
            for stage in ("encode_ms", "denoise_ms", "decode_ms", "save_ms"):
                figures["stages_1024"][stage] = round(statistics.median(getattr(r.timings, stage) for r in results), 1)
            figures["stages_1024"]["dit_step_ms"] = round(figures["stages_1024"]["denoise_ms"] / STEPS, 1)
        print(f"ours {key}: {figures['end_to_end_ms'][key]} ms", flush=True)
    return figures


def run(args, report: dict[str, object]) -> None:
    """Fills `report` as it goes, so a failure late in the run still leaves the figures measured before it."""
    loaded = build_pipe(args)
    pipe = loaded.pipe
    pipe.set_progress_bar_config(disable=True)
    sizes = [size for size in SIZES if size in args.sizes]
    report |= {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "diffusers": sys.modules["diffusers"].__version__,
        "transformers": sys.modules["transformers"].__version__, "python": platform.python_version(),
        "weights": loaded.source, "steps": STEPS, "runs": args.runs, "size_runs": args.size_runs,
        "profile": "low-vram" if args.low_vram else "default",
    }
    stock = Stock(pipe)
    output_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    if args.low_vram:
        acceleration.offload_text_encoder(pipe, loaded.device)
    if args.gpu_memory_limit_gib:  # after building: random weights are made on the GPU, text encoder included
        torch.cuda.set_per_process_memory_fraction(
            args.gpu_memory_limit_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    else:
        rate = matmul_tflops()
        report["matmul_tflops"] = round(rate, 1)
        report["stock"] = measure_stock(stock, sizes, args.runs, args.size_runs)
        stock_latents = stock.latents(stock.encode(), *HEADLINE)
        stock_image = np.asarray(stock.image(*HEADLINE))
        padded = stock.encode()[0]
        tokens = padded.shape[0]
        unpadded = stock.encode(tokens)[0]
        flops = count_flops(stock, tokens)
        total_tflop = (flops["text_encode_unpadded_tflop"] + STEPS * flops["dit_step_tflop"]
                       + flops["vae_decode_tflop"])
        report["flops_1024"] = {**{k: round(v, 2) for k, v in flops.items()}, "total_tflop": round(total_tflop, 2),
                                "compute_bound_ms": round(total_tflop / rate * 1000, 1)}
        floor_latents = stock.latents([unpadded], *HEADLINE)
        eager_encode = stage_table(stock, *HEADLINE, args.runs, encode_length=tokens)
        report["levers"] = {
            "unpadded_prompt": {"tokens": tokens, "padded_ms": report["stock"]["stages_1024"]["text_encode_ms"],
                                "unpadded_ms": eager_encode["text_encode_ms"],
                                "embeddings_max_abs_diff": float((padded.float() - unpadded.float()).abs().max()),
                                "embeddings_max_abs": float(padded.float().abs().max()),
                                "embeddings_relative_rms_diff": float((padded.float() - unpadded.float()).norm()
                                                                      / padded.float().norm())},
            "attention_dit_step_ms": attention_lever(stock, pipe, [unpadded], args.runs),
        }
    torch.cuda.reset_peak_memory_stats()
    # The service's own options from its defaults file, with this run's sizes, output and switches.
    settings = load_settings(["--max-w", "2048", "--max-h", "2048", "--output-dir", str(output_dir)], environ={})
    options = replace(engine_options(settings, loaded.source, on_gpu=True), compile_model=not args.no_compile,
                      gpu_memory_limit_bytes=args.gpu_memory_limit_gib * 2**30)
    engine = Engine(loaded, options)
    engine.warm_up()
    report["attention"] = engine.attention_backend
    report["memory_guard_need_1024_gib"] = round(engine.memory_guard.need_bytes(1024, 1024) / 2**30, 2)
    if not args.low_vram:
        eager = stage_table(stock, *HEADLINE, args.runs, encode_length=tokens)
        report["levers"]["eager_with_chosen_attention"] = eager
    started = time.perf_counter()
    engine.start_background_work().join()  # the text encoder's graphs, then the compile where on
    if engine.compile_model:
        report["compile_s"] = round(time.perf_counter() - started, 1)
        report["compiled"] = engine.compiled
    report["ours"] = engine_figures(engine, sizes, args.runs, args.size_runs)
    if args.oom_check:
        report["oom_check"] = oom_check(engine, HEADLINE[0])
    if not args.low_vram:
        stock = Stock(engine.pipeline)  # the compiled copy, where compilation is on
        compiled = stage_table(stock, *HEADLINE, args.runs, encode_length=tokens)
        report["levers"]["compiled"] = compiled
        with torch.inference_mode():
            embeds, _ = engine.encode_prompt(PROMPT)
        report["levers"]["cuda_graphs_ceiling"] = {f"{w}x{h}": gpu_idle_in_denoise(stock, embeds, w, h)
                                                   for w, h in ((512, 512), HEADLINE)}
        image_tokens = (HEADLINE[0] // 16) * (HEADLINE[1] // 16)
        report["levers"]["fused_projections_ceiling"] = fused_projections_ceiling(pipe.transformer,
                                                                                  image_tokens + embeds[0].shape[0])
        with torch.inference_mode():
            our_latents = stock.latents(embeds, *HEADLINE)
        ours_image = np.asarray(engine.generate(GenerationRequest(PROMPT, *HEADLINE, steps=STEPS, seed=SEED)).image)
        report["same_math_1024"] = {
            # Stock against itself with only the prompt's padding changed (eager, same kernels otherwise): how far
            # rounding alone moves 8 steps of this model, for scale.
            "rounding_floor_latents_max_abs_diff": float((floor_latents.float() - stock_latents.float()).abs().max()),
            "latents_max_abs_diff": float((our_latents.float() - stock_latents.float()).abs().max()),
            "latents_max_abs": float(stock_latents.float().abs().max()),
            "image_psnr_db": psnr(ours_image, stock_image),
            "image_max_pixel_diff": int(np.abs(ours_image.astype(int) - stock_image.astype(int)).max()),
        }
        key = "x".join(map(str, HEADLINE))
        report["speedup_1024"] = round(report["stock"]["end_to_end_ms"][key] / report["ours"]["end_to_end_ms"][key],
                                       3)


def oom_check(engine: Engine, side: int) -> dict[str, object]:
    """A real CUDA out-of-memory: cap this process's GPU memory a little above what `side`² needs, ask for twice the
    side, and compare allocated memory before that request with after the engine recovered."""
    from pipeline.engine import GenerationError

    torch.cuda.reset_peak_memory_stats()
    engine.generate(GenerationRequest(PROMPT, width=side, height=side, steps=STEPS, seed=2))
    cap = torch.cuda.max_memory_reserved() + 2 * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    allocated_before = torch.cuda.memory_allocated()
    try:
        engine.generate(GenerationRequest(PROMPT, width=2 * side, height=2 * side, steps=STEPS, seed=3))
        message = "no OOM: the larger request fitted"
    except GenerationError as error:
        message = str(error)
    allocated_after = torch.cuda.memory_allocated()
    after = engine.generate(GenerationRequest(PROMPT, width=side, height=side, steps=STEPS, seed=2))
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"cap_gib": round(cap / 2**30, 2), "message": message,
            "allocated_before_oom_mib": allocated_before // 2**20,
            "allocated_after_recovery_mib": allocated_after // 2**20, "next_request_ok": after.path.is_file()}


def print_table(report: dict[str, object]) -> None:
    print(f"\n{report['gpu']} torch {report['torch']} diffusers {report['diffusers']} ({report['profile']})")
    print(f"{'size':>10} {'stock ms':>10} {'ours ms':>10} {'+png ms':>10} {'speed-up':>9} "
          f"{'ours peak alloc/res GiB':>24}")
    for key, ours_ms in report["ours"]["end_to_end_ms"].items():
        stock_ms = report.get("stock", {}).get("end_to_end_ms", {}).get(key)
        ratio = f"{stock_ms / ours_ms:.2f}×" if stock_ms else "-"
        peak = report["ours"]["peak_gib"][key]
        print(f"{key:>10} {stock_ms or '-':>10} {ours_ms:>10} {report['ours']['with_png_save_ms'][key]:>10} "
              f"{ratio:>9} {f'{peak[0]} / {peak[1]}':>24}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--random-weights", action="store_true", help="the full-size architecture, random bf16")
    source.add_argument("--model-dir", type=Path, help="real weights (layout A or B)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs at 1024² after a warm-up (default: 5)")
    parser.add_argument("--size-runs", type=int, default=3, help="timed runs at the other sizes (default: 3)")
    parser.add_argument("--sizes", nargs="+", default=[f"{w}x{h}" for w, h in SIZES],
                        help="sizes to time, WxH (default: all six)")
    parser.add_argument("--low-vram", action="store_true",
                        help="measure only the engine's low-VRAM profile (peak memory and latency)")
    parser.add_argument("--gpu-memory-limit-gib", type=int, default=0,
                        help="cap the process's GPU memory, as app.py's flag does (default: no cap)")
    parser.add_argument("--no-compile", action="store_true", help="leave the engine eager")
    parser.add_argument("--compile-cache-dir", type=Path, help="Inductor/Triton cache (default: their own)")
    parser.add_argument("--oom-check", action="store_true",
                        help="also provoke a real CUDA OOM (memory capped) and check the engine recovers from it")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    args.sizes = [tuple(int(side) for side in size.split("x")) for size in args.sizes]
    if HEADLINE not in args.sizes:
        args.sizes.append(HEADLINE)
    if not torch.cuda.is_available():
        print("bench: no CUDA GPU visible; this script measures the GPU path only.", file=sys.stderr)
        return 2
    if args.compile_cache_dir:
        acceleration.use_compile_cache(args.compile_cache_dir)
    figures: dict[str, object] = {}
    try:
        run(args, figures)
        print_table(figures)
    finally:
        report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
