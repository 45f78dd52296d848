import pytest

from pipeline.memory import GIB, SAFETY_FACTOR, Line, MemoryGuard
from pipeline.requests import RequestError

ZERO = Line(fixed_bytes=0, bytes_per_pixel=0)


def _guard(available_gib: float, fixed_gib: float, per_pixel: float) -> MemoryGuard:
    return MemoryGuard(available_bytes=int(available_gib * GIB), denoise=Line(fixed_gib * GIB, per_pixel),
                       decode=ZERO)


def test_the_lines_through_two_measurements_predict_other_sizes():
    small = (768 * 768, GIB + 768 * 768 * 1000, 100)
    large = (1024 * 1024, GIB + 1024 * 1024 * 1000, 200)
    guard = MemoryGuard.from_measurements(small, large, available_bytes=100 * GIB)
    assert guard.denoise.bytes_per_pixel == pytest.approx(1000)
    assert guard.denoise.fixed_bytes == pytest.approx(GIB)
    assert guard.need_bytes(2048, 1152) == pytest.approx(SAFETY_FACTOR * (GIB + 2048 * 1152 * 1000), rel=1e-6)


def test_the_stage_with_the_larger_peak_sets_the_need():
    # Full-frame decoding grows fast with the size and passes denoising's peak above about 1.5 megapixels.
    guard = MemoryGuard(available_bytes=100 * GIB, denoise=Line(2 * GIB, 500), decode=Line(0, 2000))
    assert guard.need_bytes(512, 512) == int(SAFETY_FACTOR * (2 * GIB + 512 * 512 * 500))
    assert guard.need_bytes(2048, 2048) == int(SAFETY_FACTOR * 2048 * 2048 * 2000)


def test_tiled_decoding_no_longer_condemns_large_sizes():
    """The low-VRAM profile: measured at two tiled sizes, decoding hardly grows, and 2048×1152 fits in 4 GiB (a
    line fitted on a small untiled decode refused it)."""
    tiled = MemoryGuard.from_measurements((768 * 768, int(0.9 * GIB), int(0.6 * GIB)),
                                          (1024 * 1024, int(1.3 * GIB), int(0.65 * GIB)), available_bytes=4 * GIB)
    tiled.check(2048, 1152)
    assert tiled.fits(2048, 1152) and not tiled.fits(4096, 4096)


def test_a_size_that_does_not_fit_is_refused_with_both_figures():
    guard = _guard(available_gib=2, fixed_gib=0.5, per_pixel=1000)
    guard.check(1024, 1024)
    with pytest.raises(RequestError, match=r"2048×2048 needs about 5\.5 GiB .* only 2\.0 GiB is available"):
        guard.check(2048, 2048)


def test_largest_square_is_the_edge_of_what_check_lets_through():
    guard = _guard(available_gib=3, fixed_gib=0.5, per_pixel=1500)
    side = guard.largest_square()
    guard.check(side, side)
    with pytest.raises(RequestError):
        guard.check(side + 16, side + 16)


def test_a_noisy_measurement_never_gives_negative_memory():
    guard = MemoryGuard.from_measurements((65536, 5 * GIB, GIB), (262144, 4 * GIB, GIB), available_bytes=GIB)
    assert guard.denoise.bytes_per_pixel == 0 and guard.need_bytes(16, 16) > 0
