"""Write a tiny random-weight Z-Image-Turbo in one of the two accepted layouts (for tests and trying the service).

    python scripts/make_tiny_model.py --layout single-file /tmp/tiny-a
    python scripts/make_tiny_model.py --layout diffusers /tmp/tiny-b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (offline flags before the Hugging Face imports)
from pipeline.layouts import LayoutKind  # noqa: E402
from pipeline.random_model import make_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=[kind.value for kind in LayoutKind], default=LayoutKind.SINGLE_FILE.value,
                        help="single-file: the three ComfyUI-style files (layout A); diffusers: the folder layout "
                        "(layout B) (default: single-file)")
    parser.add_argument("out", type=Path, help="directory to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        make_tiny_model(args.out.resolve(), LayoutKind(args.layout))
    except FileExistsError as error:
        print(f"make_tiny_model: {error}", file=sys.stderr)
        return 1
    print(f"wrote a tiny {args.layout} model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
