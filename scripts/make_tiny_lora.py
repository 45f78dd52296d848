"""Write a random-weight LoRA adapter for the tiny model (or the full-size one) in one of the key formats people share
adapters for Z-Image-Turbo in (for tests, and for measuring adapters on a GPU without real ones).

    python scripts/make_tiny_lora.py --format kohya --rank 4 /tmp/tiny-a/loras/ink.safetensors
    python scripts/make_tiny_lora.py --full-size --rank 32 /data/loras/style-a.safetensors      # ~0.3 GB at rank 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (offline flags before the Hugging Face imports)
from pipeline.random_adapters import KeyFormat, write_random_adapter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", choices=[key_format.value for key_format in KeyFormat],
                        default=KeyFormat.KOHYA.value,
                        help="diffusers (transformer.…lora_A), peft (diffusion_model.…lora_A.default), comfyui "
                        "(diffusion_model.…lora_down + alpha) or kohya (lora_unet_… + alpha) (default: kohya)")
    parser.add_argument("--rank", type=int, default=4, help="the adapter's rank (default: 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of its random weights (default: 1)")
    parser.add_argument("--full-size", action="store_true",
                        help="for the real architecture (every attention and feed-forward projection of the 6B DiT)")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error("--rank must be at least 1")
    if args.out.suffix != ".safetensors":
        parser.error("the file must end in .safetensors: the service reads no other adapter files")
    write_random_adapter(args.out, KeyFormat(args.format), args.rank, args.seed, full_size=args.full_size)
    print(f"wrote a rank-{args.rank} {args.format} adapter for the {'full-size' if args.full_size else 'tiny'} model "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
