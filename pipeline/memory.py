"""Refusing a request that cannot fit in GPU memory before it starts, instead of failing it with an OOM midway."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.requests import RequestError


GIB = 2**30
SAFETY_FACTOR = 1.25  # the lines come from two sizes; fragmentation and rounding get a quarter on top


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
                f"{self.available_bytes / GIB:.1f} GiB is available next to the model. Choose a smaller size.")

    def largest_square(self) -> int:
        """The largest square size (in 16-pixel steps) this guard lets through, for the start-up log."""
        side = 16
        while self.fits(side + 16, side + 16) and side < 8192:
            side += 16
        return side
