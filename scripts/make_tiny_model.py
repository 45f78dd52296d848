"""Write a tiny random-weight Z-Image-Turbo in one of the two accepted layouts (for tests and trying the service).

    python scripts/make_tiny_model.py --layout single-file /tmp/tiny-a
    python scripts/make_tiny_model.py --layout diffusers /tmp/tiny-b
    python scripts/make_tiny_model.py --full-size --device cuda /data/random-full   # GPU host: real sizes, ~20 GB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (offline flags before the Hugging Face imports)
from pipeline.layouts import LayoutKind  # noqa: E402
from pipeline.random_model import FULL_SIZE, TINY, write_random_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=[kind.value for kind in LayoutKind], default=LayoutKind.SINGLE_FILE.value,
                        help="single-file: the three ComfyUI-style files (layout A); diffusers: the folder layout "
                        "(layout B) (default: single-file)")
    parser.add_argument("--full-size", action="store_true",
                        help="the real architecture (6B DiT, Qwen3-4B, Flux VAE) with random weights instead of the "
                        "tiny one: for measuring load and speed on a GPU host without the real files")
    parser.add_argument("--device", default="cpu", help="where to build the weights (cuda: seconds for full size)")
    parser.add_argument("out", type=Path, help="directory to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        write_random_model(args.out.resolve(), LayoutKind(args.layout), FULL_SIZE if args.full_size else TINY,
                           args.device)
    except FileExistsError as error:
        print(f"make_tiny_model: {error}", file=sys.stderr)
        return 1
    print(f"wrote a {'full-size' if args.full_size else 'tiny'} random {args.layout} model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
