import pytest

from pipeline.memory import GIB, SAFETY_FACTOR, MemoryGuard
from pipeline.requests import RequestError


def test_the_line_through_two_measurements_predicts_other_sizes():
    small = (256 * 256, GIB + 256 * 256 * 1000)
    large = (512 * 512, GIB + 512 * 512 * 1000)
    guard = MemoryGuard.from_measurements(small, large, available_bytes=100 * GIB)
    assert guard.bytes_per_pixel == pytest.approx(1000)
    assert guard.fixed_bytes == pytest.approx(1 * GIB)
    assert guard.need_bytes(1024, 1024) == pytest.approx(SAFETY_FACTOR * (GIB + 1024 * 1024 * 1000), rel=1e-6)


def test_a_size_that_does_not_fit_is_refused_with_both_figures():
    guard = MemoryGuard(available_bytes=2 * GIB, fixed_bytes=0.5 * GIB, bytes_per_pixel=1000)
    guard.check(1024, 1024)
    with pytest.raises(RequestError, match=r"2048×2048 needs about 5\.5 GiB .* only 2\.0 GiB is available"):
        guard.check(2048, 2048)


def test_largest_square_is_the_edge_of_what_check_lets_through():
    guard = MemoryGuard(available_bytes=3 * GIB, fixed_bytes=0.5 * GIB, bytes_per_pixel=1500)
    side = guard.largest_square()
    guard.check(side, side)
    with pytest.raises(RequestError):
        guard.check(side + 16, side + 16)


def test_a_noisy_measurement_never_gives_negative_memory():
    guard = MemoryGuard.from_measurements((65536, 5 * GIB), (262144, 4 * GIB), available_bytes=GIB)
    assert guard.bytes_per_pixel == 0 and guard.need_bytes(16, 16) > 0
