import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline import png
from pipeline.png import Text, encode_png


def _chunks(encoded: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk, read by hand so the tests do not lean on the reader they check against."""
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(encoded):
        (length,) = struct.unpack(">I", encoded[at:at + 4])
        chunks.append((encoded[at + 4:at + 8], encoded[at + 8:at + 8 + length]))
        at += 12 + length
    assert at == len(encoded)
    return chunks


def _decoded(encoded: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as image:
        image.verify()  # every chunk's CRC
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def _smooth(height: int, width: int) -> np.ndarray:
    """A gradient with a little noise: compressible like a photo's sky, not trivially like a flat colour."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noise = np.random.default_rng(1).integers(0, 3, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _stripes(height: int, width: int, across: bool) -> np.ndarray:
    """Random colours, each held along a row (`across`, which Sub filters to zeros) or down a column (Up does)."""
    rng = np.random.default_rng(3)
    if across:
        return np.repeat(rng.integers(0, 256, (height, 1, 3), dtype=np.uint8), width, axis=1)
    return np.repeat(rng.integers(0, 256, (1, width, 3), dtype=np.uint8), height, axis=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (3, 17), (1500, 11), (37, 333)])
def test_pixels_come_back_identical(shape):
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decoded(encode_png(pixels)), pixels)


@pytest.mark.parametrize("make", [
    lambda: np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8),
    lambda: _smooth(1024, 1024),
    lambda: _stripes(1024, 1024, across=True),
    lambda: _stripes(1024, 1024, across=False),
], ids=["noise", "smooth", "rows", "columns"])
def test_large_images_come_back_identical_as_one_valid_zlib_stream(make):
    pixels = make()
    encoded = encode_png(pixels)
    np.testing.assert_array_equal(_decoded(encoded), pixels)
    # zlib.decompress checks the stream's header, its end and its Adler-32, which Pillow may stop short of.
    assert len(zlib.decompress(_idat_stream(encoded))) == 1024 * (1 + 1024 * 3)


@pytest.mark.parametrize(("across", "filter_type"), [(True, 1), (False, 2)])  # 1 Sub, 2 Up
def test_the_filter_that_leaves_less_is_chosen(across, filter_type):
    filtered = np.frombuffer(zlib.decompress(_idat_stream(encode_png(_stripes(64, 64, across)))), np.uint8)
    assert (filtered.reshape(64, 1 + 64 * 3)[:, 0] == filter_type).all()


def test_large_image_is_deflated_in_strips(monkeypatch):
    monkeypatch.setattr(png, "_STRIPS", 8)  # as on the server, whatever this machine's core count
    pixels = _smooth(1024, 1024)
    encoded = encode_png(pixels)
    idats = [data for kind, data in _chunks(encoded) if kind == b"IDAT"]
    assert len(idats) == 9  # eight strips, then the stream's Adler-32, known only once every strip is done
    assert idats[-1] == struct.pack(">I", zlib.adler32(zlib.decompress(b"".join(idats))))
    stream = b"".join(idats)
    one_strip = zlib.compress(zlib.decompress(stream), png.LEVEL)
    assert stream != one_strip
    np.testing.assert_array_equal(_decoded(encoded), pixels)


def test_each_strip_takes_the_filter_that_leaves_less_there(monkeypatch):
    """A strip is filtered on its own thread, with the row above it for Up: the top half's rows repeat along the
    row (Sub leaves zeros), the bottom half's down the column (Up does)."""
    monkeypatch.setattr(png, "_STRIPS", 2)
    monkeypatch.setattr(png, "_STRIP_BYTES", 64 * 64 * 3 // 2)
    pixels = np.concatenate([_stripes(32, 64, across=True), _stripes(32, 64, across=False)])
    encoded = encode_png(pixels)
    filtered = np.frombuffer(zlib.decompress(_idat_stream(encoded)), np.uint8).reshape(64, 1 + 64 * 3)
    assert (filtered[:32, 0] == 1).all() and (filtered[32:, 0] == 2).all()
    np.testing.assert_array_equal(_decoded(encoded), pixels)


@pytest.mark.parametrize("lengths", [(0, 5), (7, 0), (1, 65521), (65522, 3), (100_000, 200_003)])
def test_adler32_of_two_pieces_combines_as_zlib_computes_it_whole(lengths):
    first, second = (np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths)
    assert png._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(
        first + second)


def test_small_image_is_one_strip_and_matches_plain_zlib():
    """The reference in the strip test is fair: one strip is exactly what zlib.compress writes."""
    stream = _idat_stream(encode_png(_smooth(64, 64)))
    assert stream == zlib.compress(zlib.decompress(stream), png.LEVEL)


def test_smooth_image_compresses_well_below_raw_and_about_as_well_as_pillow():
    pixels = _smooth(1024, 1024)
    pillow = io.BytesIO()
    Image.fromarray(pixels).save(pillow, format="PNG", compress_level=1)
    size = len(encode_png(pixels))
    assert size < 0.4 * pixels.nbytes and size < 1.05 * len(pillow.getvalue())


@pytest.mark.parametrize("prompt", ["a ginger cat, café au lait", "一只橘猫在雪地里"])
def test_text_chunks_read_back_and_match_what_pillow_writes(prompt):
    parameters = '{"prompt": "%s", "seed": 1}' % prompt
    encoded = encode_png(np.zeros((2, 2, 3), np.uint8),
                         [Text("zimage-turbo", parameters, utf8=True), Text("parameters", prompt)])
    with Image.open(io.BytesIO(encoded)) as image:
        assert image.text == {"zimage-turbo": parameters, "parameters": prompt}
    info = PngInfo()
    info.add_itxt("zimage-turbo", parameters)
    info.add_text("parameters", prompt)  # tEXt for the Latin-1 prompt, iTXt for the Chinese one
    assert [chunk for chunk in _chunks(encoded) if chunk[0] in (b"tEXt", b"iTXt")] == [
        (kind, data) for kind, data, _ in info.chunks]


def test_text_chunks_come_before_the_image_data():
    kinds = [kind for kind, _ in _chunks(encode_png(np.zeros((2, 2, 3), np.uint8), [Text("k", "v")]))]
    assert kinds == [b"IHDR", b"tEXt", b"IDAT", b"IDAT", b"IEND"]  # the image data, then its Adler-32


@pytest.mark.parametrize("pixels", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                    np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_anything_but_rgb_uint8_is_refused(pixels):
    with pytest.raises(ValueError, match="RGB uint8"):
        encode_png(pixels)


def test_bad_text_key_is_refused():
    with pytest.raises(ValueError, match="1-79 Latin-1"):
        encode_png(np.zeros((1, 1, 3), np.uint8), [Text("k" * 80, "v")])


def _idat_stream(encoded: bytes) -> bytes:
    return b"".join(data for kind, data in _chunks(encoded) if kind == b"IDAT")
