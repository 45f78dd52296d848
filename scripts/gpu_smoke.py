"""The engine on a CUDA GPU with the full-size Z-Image-Turbo architecture and random bf16 weights.

Speed does not depend on weight values, so this measures what the real model costs without its 20 GB of files:
time per image (median of --runs after a warm-up), stage times, and peak GPU memory. Prints a table and JSON.

    PYTHONPATH=. python scripts/gpu_smoke.py --size 1024 --runs 5 --json smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import pipeline  # noqa: F401  (offline flags before the HF imports)
from pipeline.engine import Engine
from pipeline.loader import LoadedPipeline
from pipeline.random_model import FULL_SIZE, build_components
from pipeline.requests import GenerationRequest, Limits

PROMPT = "一只戴着红色围巾的橘猫坐在雪地里, a ginger cat in a red scarf sitting in the snow, photo, 85mm"


def oom_check(engine: Engine, size: int, steps: int) -> dict[str, object]:
    """A real CUDA out-of-memory: cap this process's GPU memory a little above what `size` needs, ask for twice
    the size, and compare allocated memory before that request with after the engine recovered."""
    from pipeline.engine import GenerationError

    torch.cuda.reset_peak_memory_stats()
    engine.generate(GenerationRequest(PROMPT, width=size, height=size, steps=steps, seed=2))
    cap = torch.cuda.max_memory_reserved() + 2 * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    allocated_before = torch.cuda.memory_allocated()
    try:
        engine.generate(GenerationRequest(PROMPT, width=2 * size, height=2 * size, steps=steps, seed=3))
        message = "no OOM: the larger request fitted"
    except GenerationError as error:
        message = str(error)
    allocated_after = torch.cuda.memory_allocated()
    after = engine.generate(GenerationRequest(PROMPT, width=size, height=size, steps=steps, seed=2))
    torch.cuda.set_per_process_memory_fraction(1.0)
    return {"oom_cap_gib": round(cap / 2**30, 2), "oom_message": message,
            "allocated_before_oom_mib": allocated_before // 2**20,
            "allocated_after_recovery_mib": allocated_after // 2**20, "next_request_ok": after.path.is_file()}


def measure(size: int, steps: int, runs: int, attention: str, check_oom: bool) -> dict[str, object]:
    from diffusers import ZImagePipeline

    device = torch.device("cuda")
    started = time.perf_counter()
    components = build_components(FULL_SIZE, device)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    loaded = LoadedPipeline(pipe=ZImagePipeline(**components), source="random full-size", device=device,
                            dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as output_dir:
        engine = Engine(loaded, limits=Limits(max_h=2048, max_w=2048), output_dir=Path(output_dir),
                        model_name="random full-size", attention_choice=attention)
        engine.warm_up()
        request = GenerationRequest(PROMPT, width=size, height=size, steps=steps, seed=1)
        engine.generate(request)  # the first full-size call pays for cuDNN/cuBLAS autotuning
        torch.cuda.reset_peak_memory_stats()
        results = [engine.generate(request) for _ in range(runs)]
        same_pixels = all(r.image.tobytes() == results[0].image.tobytes() for r in results)
        peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        oom = oom_check(engine, size, steps) if check_oom else {}
    timings = [r.timings for r in results]

    def median(field: str) -> float:
        return round(statistics.median(getattr(t, field) for t in timings), 1)

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "diffusers": sys.modules["diffusers"].__version__,
        "attention": engine.attention_backend,
        "size": size,
        "steps": steps,
        "runs": runs,
        "build_random_model_s": round(build_s, 1),
        "total_ms_median": median("total_ms"),
        "total_ms_min": round(min(t.total_ms for t in timings), 1),
        "total_ms_max": round(max(t.total_ms for t in timings), 1),
        "encode_ms_median": median("encode_ms"),
        "denoise_ms_median": median("denoise_ms"),
        "decode_ms_median": median("decode_ms"),
        "save_ms_median": median("save_ms"),
        "peak_allocated_gib": round(peak_allocated / 2**30, 2),
        "peak_reserved_gib": round(peak_reserved / 2**30, 2),
        "same_seed_same_pixels": same_pixels,
        **oom,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image width and height (default: 1024)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default: 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations after warm-up (default: 5)")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "xformers"],
                        help="attention backend to ask for (default: auto)")
    parser.add_argument("--oom-check", action="store_true",
                        help="also provoke a real CUDA OOM (memory capped) and check the engine recovers from it")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU visible; this script measures the GPU path only.", file=sys.stderr)
        return 2
    figures = measure(args.size, args.steps, args.runs, args.attention, args.oom_check)
    for key, value in figures.items():
        print(f"{key:>24}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
