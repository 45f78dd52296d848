"""Time the PNG encoding of a 1024² image: Pillow at level 1 (what the service used) vs pipeline.png's parallel one.

    PYTHONPATH=. .venv/bin/python scripts/bench_png.py

Two images: noise (random weights paint it; deflate cannot shrink it: the worst case) and a photo (scikit-image's
astronaut, upscaled, where scikit-image is installed; else a noisy gradient). Prints median and max of 9 runs.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
from PIL import Image

from pipeline.png import Text, encode_png

SIDE = 1024
RUNS = 9
TEXTS = [Text("zimage-turbo", '{"prompt": "a ginger cat"}', utf8=True), Text("parameters", "a ginger cat\nSteps: 8")]


def natural_image() -> tuple[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        y, x = np.mgrid[0:SIDE, 0:SIDE]
        gradient = np.stack([x / 4, y / 4, (x + y) / 8], axis=-1) % 256
        grain = np.random.default_rng(1).integers(-3, 4, gradient.shape)
        return "gradient", (gradient + grain).clip(0, 255).astype(np.uint8)
    return "photo", np.asarray(Image.fromarray(data.astronaut()).resize((SIDE, SIDE), Image.BICUBIC))


def pillow_level_1(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def main() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    for name, array in (("noise", noise), natural_image()):
        for label, encode in (("pillow_level1", pillow_level_1), ("ours", lambda a: encode_png(a, TEXTS))):
            encode(array)
            times = []
            for _ in range(RUNS):
                started = time.perf_counter()
                size = len(encode(array))
                times.append((time.perf_counter() - started) * 1000)
            print(f"png {name} {label}: median {statistics.median(times):.1f} ms max {max(times):.1f} ms "
                  f"{size // 1024} KiB")


if __name__ == "__main__":
    main()
