"""The text encoder on new prompts, as the engine runs it, with PyTorch's default attention kernels and without
cuDNN's (which builds a plan per new sequence length); a repeated prompt for comparison.

    PYTHONPATH=. python scripts/bench_text_encoder.py /data/random-full     # a weights dir, layout A or B (CUDA)

Prints, per variant and twice over, the median and max of 12 new prompts (5–120 words) and the median of a repeated
one, in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import pipeline  # noqa: F401  (offline flags before the HF imports)
from pipeline.engine import MAX_SEQUENCE_LENGTH, Engine
from pipeline.loader import load_pipeline
from pipeline.requests import Limits

WORDS = ("a lighthouse on cliff at dusk misty harbour old fishing boat golden hour portrait woman red scarf city "
         "street rain neon").split()
NEW_PROMPTS = 12
REPEATS = 6


def timed_ms(encode) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    encode()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args()
    loaded = load_pipeline(args.model_dir, torch.device("cuda"))
    engine = Engine(loaded, limits=Limits(2048, 2048), output_dir=Path(tempfile.mkdtemp()), model_name="bench")
    pipe, rng = engine.pipeline, random.Random(0)

    def encode(prompt: str):
        # The pipeline's own encoding unpadded, as Engine.encode_prompt calls it, but under the variant's kernels
        # rather than the engine's choice.
        templated = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=True)
        tokens = min(len(pipe.tokenizer(templated).input_ids), MAX_SEQUENCE_LENGTH)
        return lambda: pipe.encode_prompt(prompt, device="cuda", do_classifier_free_guidance=False,
                                          max_sequence_length=tokens)

    variants = {"default": contextlib.nullcontext,
                "no_cudnn": lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH])}
    for round_number in (1, 2):
        for name, kernels in variants.items():
            with torch.inference_mode(), kernels():
                timed_ms(encode(f"warm up {name} {round_number}"))
                new = [timed_ms(encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + f" {i}"))
                       for i in range(NEW_PROMPTS)]
                repeated = [timed_ms(encode("the same prompt every time")) for _ in range(REPEATS)]
            print(f"text encoder {name} (round {round_number}): new prompts median {statistics.median(new):.1f} "
                  f"max {max(new):.1f} ms; repeated {statistics.median(repeated[1:]):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
