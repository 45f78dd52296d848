"""Refusing a request that cannot fit in GPU memory before it starts, instead of failing it with an OOM midway."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.requests import RequestError

log = logging.getLogger("zimage.memory")


GIB = 2**30
SAFETY_FACTOR = 1.25  # the lines come from two sizes; fragmentation and rounding get a quarter on top
# The two square generations the guard's lines go through: large enough that fixed overheads do not hide the slope,
# and both above the low-VRAM profile's 512-px tile, so there both decode in tiles as large requests do.
PROBE_SIDES = (768, 1024)


@dataclass(frozen=True)
class Line:
    """Peak bytes of one stage above the idle model, as a function of the image's pixel count."""

    fixed_bytes: float
    bytes_per_pixel: float

    @classmethod
    def through(cls, small: tuple[int, int], large: tuple[int, int]) -> Line:
        """The line through two (pixels, peak bytes) measurements; never sloping down, never below zero."""
        (pixels_a, bytes_a), (pixels_b, bytes_b) = small, large
        per_pixel = max(bytes_b - bytes_a, 0) / (pixels_b - pixels_a)
        return cls(fixed_bytes=max(bytes_b - per_pixel * pixels_b, 0), bytes_per_pixel=per_pixel)

    def at(self, pixels: int) -> float:
        return self.fixed_bytes + self.bytes_per_pixel * pixels


@dataclass(frozen=True)
class MemoryGuard:
    """A request's peak is the larger of two stages' peaks, each linear in the pixel count: denoising (the DiT's
    attention runs in flash kernels, linear in tokens) and decoding (the VAE is convolutional; decoded in tiles,
    its peak hardly grows). One line through both would be wrong wherever the other stage dominates: fitted on
    small sizes, the full-frame decode's slope condemned large sizes that the tiled decode runs in 2 GiB."""

    available_bytes: int  # what one request may use on top of the idle model
    denoise: Line
    decode: Line

    @classmethod
    def from_measurements(cls, small: tuple[int, int, int], large: tuple[int, int, int],
                          available_bytes: int) -> MemoryGuard:
        """`small` and `large`: (pixels, denoise peak bytes, decode peak bytes) of two warm-up generations, each
        peak above the idle model."""
        (pixels_a, denoise_a, decode_a), (pixels_b, denoise_b, decode_b) = small, large
        return cls(available_bytes=available_bytes,
                   denoise=Line.through((pixels_a, denoise_a), (pixels_b, denoise_b)),
                   decode=Line.through((pixels_a, decode_a), (pixels_b, decode_b)))

    def need_bytes(self, width: int, height: int) -> int:
        pixels = width * height
        return int(SAFETY_FACTOR * max(self.denoise.at(pixels), self.decode.at(pixels)))

    def fits(self, width: int, height: int) -> bool:
        return self.need_bytes(width, height) <= self.available_bytes

    def check(self, width: int, height: int) -> None:
        need = self.need_bytes(width, height)
        if need > self.available_bytes:
            raise RequestError(
                f"{width}×{height} needs about {need / GIB:.1f} GiB of GPU memory, but only "
                f"{self.available_bytes / GIB:.1f} GiB is available next to the model. Choose a smaller size.", "size")

    def largest_square(self) -> int:
        """The largest square size (in 16-pixel steps) this guard lets through, for the start-up log."""
        side = 16
        while self.fits(side + 16, side + 16) and side < 8192:
            side += 16
        return side


def measure_guard(peaks_at: Callable[[int], tuple[int, int]], device: torch.device, limit_bytes: int) -> MemoryGuard:
    """The guard for this GPU, from two square generations: `peaks_at(side)` runs one and returns its denoise and
    decode peaks (bytes allocated). `limit_bytes`: the operator's cap on the process (0: none)."""
    idle = torch.cuda.memory_allocated(device)
    peaks = []
    for side in PROBE_SIDES:
        denoise_peak, decode_peak = peaks_at(side)
        peaks.append((side * side, denoise_peak - idle, decode_peak - idle))
    free, _total = torch.cuda.mem_get_info(device)
    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = free + reserved_unused
    if limit_bytes:
        available = min(available, limit_bytes - idle)
    guard = MemoryGuard.from_measurements(peaks[0], peaks[1], available_bytes=available)
    log.info("memory guard model_gib=%.2f available_gib=%.2f need_1024_gib=%.2f need_1536_gib=%.2f "
             "need_2048x1152_gib=%.2f largest_square=%d", idle / GIB, available / GIB,
             guard.need_bytes(1024, 1024) / GIB, guard.need_bytes(1536, 1536) / GIB,
             guard.need_bytes(2048, 1152) / GIB, guard.largest_square())
    return guard
