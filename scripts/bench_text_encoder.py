"""The text encoder on new prompts, as the engine runs it: eager (launched op by op from Python) and replayed from
CUDA graphs; a repeated prompt for comparison.

    PYTHONPATH=. python scripts/bench_text_encoder.py /data/random-full     # a weights dir, layout A or B (CUDA)

Prints, per variant and twice over, the median and max of 12 new prompts (5–120 words) and the median of a repeated
one, in milliseconds, tokenizing included (a request pays for it too).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import pipeline  # noqa: F401  (offline flags before the HF imports)
from pipeline.loader import load_pipeline
from pipeline.text_encoder import PromptEncoder

WORDS = ("a lighthouse on cliff at dusk misty harbour old fishing boat golden hour portrait woman red scarf city "
         "street rain neon").split()
NEW_PROMPTS = 12
REPEATS = 6


def timed_ms(encode, prompt: str) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    encode(prompt)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args()
    pipe = load_pipeline(args.model_dir, torch.device("cuda")).pipe
    eager = PromptEncoder(pipe.tokenizer, pipe.text_encoder, torch.device("cuda"))
    graphed = PromptEncoder(pipe.tokenizer, pipe.text_encoder, torch.device("cuda"))
    graphed.capture_graphs()
    rng = random.Random(0)
    for round_number in (1, 2):
        for name, encoder in (("eager", eager), ("graphs", graphed)):
            timed_ms(encoder.encode, f"warm up {name} {round_number}")
            new = [timed_ms(encoder.encode, " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + f" {i}")
                   for i in range(NEW_PROMPTS)]
            repeated = [timed_ms(encoder.encode, "the same prompt every time") for _ in range(REPEATS)]
            print(f"text encoder {name} (round {round_number}): new prompts median {statistics.median(new):.1f} "
                  f"max {max(new):.1f} ms; repeated {statistics.median(repeated[1:]):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
