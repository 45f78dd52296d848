import io
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.requests import RequestError
from pipeline.uploads import read_image, read_mask
from tests.helpers import PNG_SIGNATURE, bomb, chunk, hand_made_png

MAX_BYTES = 20 * 10**6
MAX_PIXELS = 50 * 10**6
LIMITS = {"max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}
ORIENTATION = 0x0112  # EXIF's tag; 6: the stored picture is to be turned 90° clockwise to stand upright


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()



def refused(call, field: str, *phrases: str) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call()
    message = str(caught.value)
    assert caught.value.field == field and message.startswith(field), message
    for phrase in phrases:
        assert phrase in message, message
    return caught.value


def noise(width: int, height: int) -> Image.Image:
    """Incompressible pixels, so that a file cut in half loses pixel data rather than only its end."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("fmt", "options", "tolerance"), [
    ("PNG", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("JPEG", {"quality": 95}, 6),
    ("WEBP", {"quality": 90}, 12),
])
def test_each_format_round_trips_its_colour(fmt, options, tolerance):
    data = encoded(Image.new("RGB", (24, 16), (200, 40, 90)), fmt, **options)
    pixels = read_image(data, "image", **LIMITS)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 24, 3)
    assert np.abs(pixels.astype(int) - (200, 40, 90)).max() <= tolerance


def palette_image(transparent: bool) -> bytes:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    return encoded(image, "PNG", **({"transparency": 1} if transparent else {}))


@pytest.mark.parametrize(("data", "expected"), [
    (encoded(Image.new("L", (2, 1), 77), "PNG"), [[77, 77, 77]] * 2),
    (encoded(Image.new("1", (2, 1), 1), "PNG"), [[255, 255, 255]] * 2),
    (encoded(Image.new("L", (2, 1), 77), "JPEG", quality=100), [[77, 77, 77]] * 2),
    (palette_image(transparent=False), [[255, 0, 0], [0, 0, 255]]),
    (palette_image(transparent=True), [[255, 0, 0], [255, 255, 255]]),  # index 1 is transparent: white shows
    (encoded(Image.new("RGBA", (2, 1), (10, 20, 30, 0)), "PNG"), [[255, 255, 255]] * 2),
    (encoded(Image.new("RGBA", (2, 1), (10, 20, 30, 255)), "PNG"), [[10, 20, 30]] * 2),
    (encoded(Image.new("RGBA", (2, 1), (10, 20, 30, 0)), "WEBP", lossless=True), [[255, 255, 255]] * 2),
    (encoded(Image.new("LA", (2, 1), (40, 0)), "PNG"), [[255, 255, 255]] * 2),
    (encoded(Image.new("L", (2, 1), 7), "PNG", transparency=7), [[255, 255, 255]] * 2),  # tRNS: grey 7
    (encoded(Image.new("RGB", (2, 1), (1, 2, 3)), "PNG", transparency=(1, 2, 3)), [[255, 255, 255]] * 2),
    # 16 bits a channel, which Pillow does not write: 65535 → 255, 32768 → 128, 0 → 0
    (hand_made_png(1, 1, 16, 2, b"\0" + struct.pack(">HHH", 65535, 32768, 0)), [[255, 128, 0]]),
    (hand_made_png(1, 1, 16, 6, b"\0" + struct.pack(">HHHH", 0, 65535, 0, 65535)), [[0, 255, 0]]),
])
def test_every_mode_becomes_rgb(data, expected):
    pixels = read_image(data, "image", **LIMITS)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.array([expected], dtype=np.uint8))


def test_half_transparent_pixels_are_blended_over_white():
    pixels = read_image(encoded(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), "PNG"), "image", **LIMITS)
    assert np.abs(pixels.astype(int) - 127).max() <= 1


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.array([[65535, 32768, 257, 0]], dtype=np.uint16))
    assert grey.mode == "I;16"
    pixels = read_image(encoded(grey, "PNG"), "image", **LIMITS)
    assert np.abs(pixels[0, :, 0].astype(int) - [255, 128, 1, 0]).max() <= 1
    assert (pixels == pixels[:, :, :1]).all()  # grey: the three bands alike


def test_cmyk_jpeg_becomes_rgb():
    data = encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # full magenta and yellow
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = read_image(data, "image", **LIMITS)
    assert pixels.shape == (16, 16, 3) and np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 8


@pytest.mark.parametrize(("fmt", "options", "tolerance"), [
    ("JPEG", {"quality": 100, "subsampling": 0}, 60),  # two pixels in one JPEG block bleed into each other
    ("WEBP", {"lossless": True}, 0),
    ("PNG", {}, 0),  # PNG's eXIf chunk
])
def test_exif_orientation_stands_the_picture_upright(fmt, options, tolerance):
    stored = Image.new("RGB", (2, 1), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    pixels = read_image(encoded(stored, fmt, exif=exif, **options), "image", **LIMITS)
    assert pixels.shape == (2, 1, 3)  # 2 wide, 1 high stored; 1 wide, 2 high shown
    # Turned clockwise: the stored left pixel (red) is now on top.
    assert np.abs(pixels[:, 0].astype(int) - [(255, 0, 0), (0, 0, 255)]).max() <= tolerance


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_animation_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    np.testing.assert_array_equal(read_image(data, "image", **LIMITS), np.full((4, 4, 3), (255, 0, 0), np.uint8))


def test_the_bomb_is_refused_at_once_without_allocating():
    data = bomb()
    assert len(data) < 1024
    tracemalloc.start()
    try:
        started = time.perf_counter()
        refused(lambda: read_image(data, "image", **LIMITS), "image", "50 megapixels")
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 0.1 and peak < 5 * 2**20, (seconds, peak)


@pytest.mark.parametrize(("width", "height"), [
    (8000, 8000),  # 64 MP: over our limit, under Pillow's own (about 89 MP): our check alone refuses it
    (10_000, 10_000),  # 100 MP: over Pillow's warning limit; with warnings made errors, as here, Pillow raises
    (1, 60_000_000),  # one pixel high: the count is what is limited, not a side
])
@pytest.mark.filterwarnings("error")
def test_a_header_over_the_pixel_limit_is_refused(width, height):
    data = bomb(width, height)
    refused(lambda: read_image(data, "image", **LIMITS), "image", "50 megapixels")
    refused(lambda: read_mask(data, "mask", (width, height), **LIMITS), "mask", "50 megapixels")


def test_the_pixel_limit_is_inclusive():
    data = encoded(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG")
    assert read_image(data, "image", max_bytes=MAX_BYTES, max_pixels=16).shape == (4, 4, 3)
    refused(lambda: read_image(data, "image", max_bytes=MAX_BYTES, max_pixels=15), "image", "4×4")


def test_a_pillow_warning_is_not_what_refuses():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warning passes: our own check has to refuse the picture
        refused(lambda: read_image(bomb(10_000, 10_000), "image", **LIMITS), "image", "10000×10000")


def test_one_byte_over_the_size_limit_is_refused_before_reading():
    data = PNG_SIGNATURE + b"\0" * (MAX_BYTES + 1 - len(PNG_SIGNATURE))
    refused(lambda: read_image(data, "image", **LIMITS), "image", "20 MB")
    small = encoded(Image.new("RGB", (4, 4)), "PNG")
    assert read_image(small, "image", max_bytes=len(small), max_pixels=MAX_PIXELS).shape == (4, 4, 3)
    refused(lambda: read_image(small, "image", max_bytes=len(small) - 1, max_pixels=MAX_PIXELS), "image", "MB")


def test_an_empty_upload_is_refused():
    refused(lambda: read_image(b"", "image", **LIMITS), "image", "empty", "PNG, JPEG or WebP")


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 90})])
def test_a_cut_short_file_is_refused(fmt, options):
    data = encoded(noise(64, 64), fmt, **options)
    read_image(data, "image", **LIMITS)
    for cut in (len(data) // 2, 40, 12):
        refused(lambda cut=cut: read_image(data[:cut], "image", **LIMITS), "image", "damaged or cut short")


@pytest.mark.parametrize("after_the_pixels", [False, True])
def test_a_png_with_an_oversized_text_chunk_is_refused(after_the_pixels):
    text = chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"a" * 2 * 2**20))  # Pillow reads at most 1 MB of text
    data = hand_made_png(1, 1, 8, 2, b"\0\0\0\0", text)
    if after_the_pixels:  # read only when the pixels are, past the header
        at = data.index(b"IEND") - 4
        data = data[:at].replace(text, b"") + text + data[at:]
    assert len(data) < 10_000
    refused(lambda: read_image(data, "image", **LIMITS), "image", "could not be read as a PNG")


def test_a_file_that_only_starts_like_a_png_is_refused():
    data = PNG_SIGNATURE + encoded(Image.new("RGB", (4, 4)), "GIF")
    refused(lambda: read_image(data, "image", **LIMITS), "image", "could not be read as a PNG")


@pytest.mark.parametrize("data", [
    encoded(Image.new("RGB", (4, 4)), "GIF"),
    encoded(Image.new("RGB", (4, 4)), "BMP"),
    encoded(Image.new("RGB", (4, 4)), "TIFF"),
    encoded(Image.new("RGB", (4, 4)), "ICO"),
    b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
    b"just some text, not a picture",
    b"RIFF\0\0\0\0WAVEfmt ",
    b"RIFX\0\0\0\0WEBPVP8 ",  # WebP's mark in a container that is not RIFF
])
def test_other_formats_are_refused_naming_those_taken(data):
    refused(lambda: read_image(data, "image", **LIMITS), "image", "PNG, JPEG or WebP")


def test_the_content_decides_not_the_name():
    # Saved through a file object named like a JPEG: the bytes are a PNG's, and read as one.
    buffer = io.BytesIO()
    buffer.name = "photo.jpg"
    Image.new("RGB", (3, 2), (5, 6, 7)).save(buffer, "PNG")
    assert buffer.getvalue().startswith(PNG_SIGNATURE)
    np.testing.assert_array_equal(read_image(buffer.getvalue(), "image", **LIMITS), np.full((2, 3, 3), (5, 6, 7)))


def mask_png(alpha: list[list[int]]) -> bytes:
    alpha_band = np.array(alpha, dtype=np.uint8)
    rgba = np.zeros((*alpha_band.shape, 4), dtype=np.uint8)
    rgba[:, :, 3] = alpha_band
    return encoded(Image.fromarray(rgba), "PNG")


def test_a_masks_transparent_pixels_are_repainted():
    # Only alpha 0 marks a pixel to repaint; even alpha 1 keeps it.
    mask = read_mask(mask_png([[0, 255, 1], [0, 0, 128]]), "mask", (3, 2), **LIMITS)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[255, 0, 0], [255, 255, 0]])


@pytest.mark.parametrize(("data", "expected"), [
    (palette_image(transparent=True), [[0, 255]]),
    (encoded(Image.new("L", (2, 1), 7), "PNG", transparency=7), [[255, 255]]),
    (encoded(Image.new("RGBA", (2, 1), (0, 0, 0, 0)), "WEBP", lossless=True), [[255, 255]]),
    (encoded(Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)), "PNG", transparency=0), [[255, 0]]),
])
def test_a_mask_may_be_transparent_in_any_way(data, expected):
    np.testing.assert_array_equal(read_mask(data, "mask", (2, 1), **LIMITS), expected)


def test_a_mask_of_another_size_is_refused_naming_both():
    refused(lambda: read_mask(mask_png([[0, 255]]), "mask", (4, 3), **LIMITS), "mask", "2×1", "4×3")


def test_a_masks_orientation_is_applied_before_its_size_is_compared():
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = Image.new("RGBA", (2, 1), (0, 0, 0, 255))
    stored.putpixel((0, 0), (0, 0, 0, 0))
    data = encoded(stored, "PNG", exif=exif)
    np.testing.assert_array_equal(read_mask(data, "mask", (1, 2), **LIMITS), [[255], [0]])
    refused(lambda: read_mask(data, "mask", (2, 1), **LIMITS), "mask", "1×2", "2×1")


@pytest.mark.parametrize("data", [
    encoded(Image.new("RGB", (2, 1)), "PNG"),
    encoded(Image.new("L", (2, 1)), "PNG"),
    encoded(Image.new("RGB", (2, 1)), "JPEG"),
    palette_image(transparent=False),
])
def test_a_mask_without_transparency_is_refused(data):
    refused(lambda: read_mask(data, "mask", (2, 1), **LIMITS), "mask", "no transparency",
            "transparent pixels (alpha 0) where the image is to change")


def test_a_mask_with_no_transparent_pixel_is_refused():
    refused(lambda: read_mask(mask_png([[255, 1]]), "mask", (2, 1), **LIMITS), "mask", "nothing would be repainted")


def test_a_mask_is_checked_like_a_picture():
    refused(lambda: read_mask(b"GIF89a", "mask", (2, 1), **LIMITS), "mask", "PNG, JPEG or WebP")
    refused(lambda: read_mask(bomb(), "mask", (50_000, 50_000), **LIMITS), "mask", "megapixels")
