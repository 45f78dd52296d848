"""The pictures an edit uploads (image-to-image's picture, inpainting's mask), read from bytes in memory into the
arrays pipeline.requests takes. Every byte is the client's, so this is where hostile files stop:
- a decompression bomb, a small file whose header claims a huge picture: Pillow's open reads only the header, and
  the pixel count it gives is refused before a pixel is decoded or a buffer allocated for them;
- an oversized or empty body, refused before Pillow sees it;
- any other format (GIF, BMP, TIFF, SVG, ...): the file's first bytes decide, never its name or declared type, and
  Pillow is told to try only that format, so none of its other parsers ever reads a client's bytes;
- damaged, cut-short or crafted files: whatever Pillow raises reading them becomes a RequestError naming the field.
Nothing is written to disk. What comes out is upright (EXIF orientation applied) and 8-bit RGB whatever the mode."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipeline.requests import RequestError

MB = 10**6  # the settings' max_upload_mb counts decimal megabytes, as do the limits in messages
MEGAPIXEL = 10**6
ACCEPTED = "PNG, JPEG or WebP"

_SHOWN_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}  # Pillow's format names, as messages write them

# Pillow warns on stderr (so in the service's log) when a header claims more pixels than its own limit, before the
# check here, a far lower limit, refuses the file: each client's choice of size would add a line. Pillow's error for
# the largest claims still comes, and is read below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def picture_format(data: bytes) -> str | None:
    """Pillow's name of the format the file's first bytes announce, or None for any other."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"RIFF") and data.startswith(b"WEBP", 8):  # a RIFF container: "RIFF", its length, "WEBP"
        return "WEBP"
    return None


def _decoded(data: bytes | memoryview, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """The upload's first frame, decoded and upright, once its size, format and pixel count are known to be fine."""
    if not data:
        raise RequestError(f"{field} is empty: send a {ACCEPTED} picture.", field)
    if len(data) > max_bytes:
        raise RequestError(f"{field} is larger than the limit of {max_bytes / MB:g} MB ({len(data):,} bytes); "
                           f"send a smaller picture.", field)
    kind = picture_format(bytes(data[:12]))  # a memoryview (webui.multipart's parts) has no startswith
    if kind is None:
        raise RequestError(f"{field} must be a {ACCEPTED} picture; this file's content is none of those.", field)
    unreadable = RequestError(f"{field} could not be read as a {_SHOWN_FORMATS[kind]}: the file is damaged or cut "
                              f"short. Save it again and send the new file.", field)
    too_large = f"{field} has more pixels than the limit of {max_pixels / MEGAPIXEL:g} megapixels"
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check, against its global limit (far above ours by default), fired first: the warning is
        # raised only where warnings are made errors (-W error).
        raise RequestError(f"{too_large}; send a smaller picture.", field) from None
    except Exception as error:
        # Pillow's parsers raise many kinds of error on crafted input (OSError, SyntaxError, ValueError for its text
        # chunk limits, struct.error, EOFError, ...); its own fuzzing harness catches Exception for that reason.
        raise unreadable from error
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"{too_large}: it is {width}×{height}. Send a smaller picture.", field)
    try:
        ImageOps.exif_transpose(image, in_place=True)  # decodes the first frame, then turns it upright
    except Exception as error:  # the pixels and the EXIF are read here: as above
        raise unreadable from error
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """`image` in a mode of 8-bit bands. 16-bit greyscale (PNG's, mode I;16) is scaled to 0-255 here because
    Pillow's own conversion clips it, making anything above 255 of 65535 white. (16-bit RGB and RGBA PNGs open as
    8-bit already.)"""
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image).astype(np.int32)
    grey = Image.fromarray(((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))
    transparent = image.info.get("transparency")  # PNG's tRNS: the one 16-bit value that is transparent
    if isinstance(transparent, int):
        grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    return grey


def _has_alpha(image: Image.Image) -> bool:
    # An alpha band (RGBA, LA, PA), or PNG's tRNS: a palette's alphas, or the one colour that is transparent.
    return "A" in image.getbands() or "transparency" in image.info


def read_image(data: bytes | memoryview, field: str, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """RGB uint8 array (height, width, 3) of an uploaded PNG, JPEG or WebP (an animation's first frame), upright,
    with any transparency shown over white; RequestError naming `field` for anything else."""
    image = _eight_bit(_decoded(data, field, max_bytes, max_pixels))
    if not _has_alpha(image):
        return np.asarray(image.convert("RGB"))  # CMYK, YCbCr, L, 1 and P too
    # Over white, as a browser shows a transparent picture on a page: the model has no notion of "no pixel".
    rgba = image.convert("RGBA")
    picture = Image.new("RGB", rgba.size, "white")
    picture.paste(rgba, mask=rgba)
    return np.asarray(picture)


def read_mask(data: bytes | memoryview, field: str, size: tuple[int, int], *, max_bytes: int,
              max_pixels: int) -> np.ndarray:
    """uint8 array (height, width): 255 where the image is to be repainted, 0 where it is kept. As OpenAI's
    images/edits reads a mask, its fully transparent pixels (alpha 0) are those to repaint; `size` is the (width,
    height) of the image it belongs to, which the mask must match once upright."""
    image = _eight_bit(_decoded(data, field, max_bytes, max_pixels))
    if image.size != tuple(size):
        raise RequestError(f"{field} is {image.width}×{image.height} but the image is {size[0]}×{size[1]}; the mask "
                           f"must be the image's size.", field)
    if not _has_alpha(image):
        raise RequestError(f"{field} has no transparency: the mask needs fully transparent pixels (alpha 0) where "
                           f"the image is to change and opaque ones elsewhere; send a PNG or WebP with an alpha "
                           f"channel.", field)
    repaint = np.where(np.asarray(image.convert("RGBA").getchannel("A")) == 0, 255, 0).astype(np.uint8)
    if not repaint.any():
        raise RequestError(f"{field} has no fully transparent pixel, so nothing would be repainted: make the "
                           f"pixels to change transparent (alpha 0).", field)
    return repaint


def read_painted(data: bytes | memoryview, field: str, size: tuple[int, int], *, max_bytes: int,
                 max_pixels: int) -> np.ndarray:
    """uint8 array (height, width): 255 where a brush layer (the page's image editor's) is painted, any opacity,
    0 where it is clear; `size` is the (width, height) of the picture it was painted over, which it must match."""
    image = _eight_bit(_decoded(data, field, max_bytes, max_pixels))
    if image.size != tuple(size):
        raise RequestError(f"{field} is {image.width}×{image.height} but the picture is {size[0]}×{size[1]}: paint "
                           f"over the picture itself.", field)
    if not _has_alpha(image):
        return np.full((image.height, image.width), 255, np.uint8)  # an opaque layer covers all of it
    return np.where(np.asarray(image.convert("RGBA").getchannel("A")) > 0, 255, 0).astype(np.uint8)
