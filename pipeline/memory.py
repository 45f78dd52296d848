"""Refusing a request that cannot fit in GPU memory before it starts, instead of failing it with an OOM midway."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.requests import RequestError

log = logging.getLogger("zimage.memory")

GIB = 2**30
SAFETY_FACTOR = 1.25  # the fit comes from two small sizes; fragmentation and rounding get a quarter on top


@dataclass(frozen=True)
class MemoryGuard:
    """A request's working memory grows linearly with its pixel count (attention runs in flash kernels, which are
    linear in tokens, and the VAE decoder is convolutional), so two measured sizes give the line."""

    available_bytes: int  # what one request may use on top of the idle model
    fixed_bytes: float
    bytes_per_pixel: float

    @classmethod
    def from_measurements(cls, small: tuple[int, int], large: tuple[int, int], available_bytes: int) -> MemoryGuard:
        """`small` and `large` are (pixels, peak bytes above the idle model) of two warm-up generations."""
        (pixels_a, bytes_a), (pixels_b, bytes_b) = small, large
        per_pixel = max(bytes_b - bytes_a, 0) / (pixels_b - pixels_a)
        return cls(available_bytes=available_bytes, fixed_bytes=max(bytes_a - per_pixel * pixels_a, 0),
                   bytes_per_pixel=per_pixel)

    def need_bytes(self, width: int, height: int) -> int:
        return int(SAFETY_FACTOR * (self.fixed_bytes + self.bytes_per_pixel * width * height))

    def check(self, width: int, height: int) -> None:
        need = self.need_bytes(width, height)
        if need > self.available_bytes:
            raise RequestError(
                f"{width}×{height} needs about {need / GIB:.1f} GiB of GPU memory, but only "
                f"{self.available_bytes / GIB:.1f} GiB is available next to the model. Choose a smaller size.")

    def largest_square(self) -> int:
        """The largest square size (in 16-pixel steps) this guard lets through, for the start-up log."""
        side = 16
        while self.need_bytes(side + 16, side + 16) <= self.available_bytes and side < 8192:
            side += 16
        return side
