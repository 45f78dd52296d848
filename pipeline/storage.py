"""Saving images so that a file on disk is always a whole PNG, JPEG or WebP carrying its generation parameters."""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import tempfile
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.png import Text, encode_png

OUTPUT_FORMATS = ("png", "jpeg", "webp")
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # each output format's file suffix
# OpenAI's output_compression defaults to 100, but at 100 a 1024² photo takes 2.7× the bytes it takes at 90 (JPEG
# 727 KiB against 271, WebP 560 against 206) for a difference no one sees.
DEFAULT_QUALITY = 90
PARAMETERS_KEY = "zimage-turbo"  # PNG text chunk holding the generation parameters as JSON
A1111_KEY = "parameters"  # the text chunk AUTOMATIC1111's web UI writes, which PNG-info tools read

# A JPEG or WebP carries both in its Exif, where AUTOMATIC1111 writes the infotext.
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286  # the infotext, b"UNICODE\0" + UTF-16BE: what A1111 (through piexif) and sd-parsers read
MAKER_NOTE = 0x927C  # our parameters as UTF-8 JSON, in the tag Exif leaves free-form for the maker
_UNDEFINED, _LONG = 7, 4  # TIFF field types
_JPEG_EXIF_BYTES = 65533  # a JPEG segment's most: its 16-bit length counts its own two bytes
# A prompt's share of that, as JSON: longer prompts are refused for JPEG before any GPU work (pipeline.requests),
# so that the JSON of every other parameter still fits beside it.
JPEG_PROMPT_BYTES = 50_000
# Timed at quality 90 on a 1024² photo (a real one, upscaled) on a 2-core AMD EPYC; encode_png took 33 ms for
# 1813 KiB there. JPEG: 4:2:0 with optimized Huffman tables, 12 ms for 265 KiB; unoptimized is 5 ms but 3% (photo)
# to 20% (smooth gradient) larger; 4:4:4 is 36% larger for colour detail WebP drops anyway (it is always 4:2:0);
# progressive, 28 ms for 5% less. WebP: method 2, 56 ms for 202 KiB; method 0 is 38 ms but 5% larger, and the
# rate-distortion search of methods 3 to 6 (Pillow's default is 4) takes 113 to 275 ms to save 3 to 5% more.
_ENCODER_OPTIONS = {"jpeg": {"format": "JPEG", "subsampling": "4:2:0", "optimize": True},
                    "webp": {"format": "WEBP", "method": 2}}


def save_image(image: Image.Image, output_dir: Path, stem: str, parameters: dict[str, object], infotext: str = "",
               output_format: str = "png", quality: int | None = None) -> Path:
    """Write `image` under `output_dir/YYYY-MM-DD/` as `output_format` (one of OUTPUT_FORMATS) and return its path.
    `parameters` go in as JSON; `infotext`, if given, where AUTOMATIC1111 writes it (see `a1111_parameters`).
    `quality`, 0 to 100 (None: DEFAULT_QUALITY), is JPEG's and WebP's; a PNG is lossless.

    Written to a temporary file, fsynced, then renamed: a crash at any moment leaves either no file or a whole one.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)} (got {output_format!r}).")
    if quality is not None and not 0 <= quality <= 100:
        raise ValueError(f"quality must be from 0 to 100 (got {quality}).")  # Pillow would clamp it without a word
    day_dir = output_dir / datetime.now().strftime("%Y-%m-%d")
    day_dir.mkdir(parents=True, exist_ok=True)
    parameters_json = json.dumps(parameters, ensure_ascii=False, sort_keys=True)
    if output_format == "png":
        texts = [Text(PARAMETERS_KEY, parameters_json, utf8=True)]
        if infotext:
            texts.append(Text(A1111_KEY, infotext))  # tEXt, or iTXt when the prompt is not Latin-1
        encoded = encode_png(np.asarray(image), texts)
    else:
        encoded = _encode_lossy(image, output_format, DEFAULT_QUALITY if quality is None else quality,
                                parameters_json, infotext)
    target = day_dir / f"{stem}{SUFFIXES[output_format]}"
    handle = tempfile.NamedTemporaryFile(dir=day_dir, prefix=f".{stem}-", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(encoded)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(day_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must survive a power cut
    finally:
        os.close(directory)
    return target


def _encode_lossy(image: Image.Image, output_format: str, quality: int, parameters_json: str, infotext: str) -> bytes:
    """The JPEG or WebP file of `image`, the parameters and the infotext in its Exif."""
    tags = {MAKER_NOTE: parameters_json.encode()}
    if infotext:
        tags[USER_COMMENT] = b"UNICODE\0" + infotext.encode("utf_16_be")
    exif = _exif(tags)
    if output_format == "jpeg" and len(exif) > _JPEG_EXIF_BYTES:
        # A prompt of several thousand characters: the infotext (the prompt again, two bytes a character) goes,
        # our JSON stays, for the galleries read it back.
        exif = _exif({MAKER_NOTE: tags[MAKER_NOTE]})
        if len(exif) > _JPEG_EXIF_BYTES:
            raise ValueError(f"The parameters take {len(exif)} bytes; a JPEG's Exif holds at most "
                             f"{_JPEG_EXIF_BYTES}. Shorten the prompt or save as png or webp.")
    buffer = io.BytesIO()
    image.save(buffer, quality=quality, exif=exif, **_ENCODER_OPTIONS[output_format])
    return buffer.getvalue()


def _exif(tags: dict[int, bytes]) -> bytes:
    """An Exif block holding `tags` in its Exif IFD, typed UNDEFINED as the Exif standard types UserComment and
    MakerNote. Written here because Pillow's `Image.Exif` types bytes as BYTE, which piexif reads as a tuple of
    ints, and A1111 then fails to decode the infotext."""
    exif_ifd_at = 8 + 2 + 12 + 4  # after the TIFF header and IFD0, whose one entry points here
    data_at = exif_ifd_at + 2 + 12 * len(tags) + 4
    entries, data = [], b""
    for tag, value in sorted(tags.items()):  # TIFF wants its entries in ascending order
        if len(value) <= 4:
            entries.append(struct.pack(">HHI4s", tag, _UNDEFINED, len(value), value))  # a short value sits in place
        else:
            entries.append(struct.pack(">HHII", tag, _UNDEFINED, len(value), data_at + len(data)))
            data += value + b"\0" * (len(value) % 2)  # each value starts on an even offset
    ifd0 = struct.pack(">HHHIII", 1, EXIF_IFD, _LONG, 1, exif_ifd_at, 0)
    exif_ifd = struct.pack(">H", len(tags)) + b"".join(entries) + struct.pack(">I", 0)  # 0: no IFD follows
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd0 + exif_ifd + data  # big-endian TIFF, IFD0 at 8


def a1111_parameters(parameters: dict[str, object]) -> str:
    """AUTOMATIC1111's infotext: the prompt, then one line of `Key: value` pairs. Z-Image-Turbo runs without
    guidance, which that format writes as CFG scale 1; the flow-matching Euler sampler is A1111's "Euler"."""
    fields = {
        "Steps": parameters["steps"], "Sampler": "Euler", "Schedule type": "Simple",
        "CFG scale": 1, "Seed": parameters["seed"],
        "Size": f"{parameters['width']}x{parameters['height']}", "Model": parameters.get("model", ""),
        "Shift": parameters["shift"],
    }
    if "strength" in parameters:  # an edit: A1111 writes an image-to-image's strength so
        fields["Denoising strength"] = parameters["strength"]
    # Adapters as A1111 writes them: their tags in the prompt, their hashes in a field of their own.
    loras = parameters.get("loras") or []
    prompt = " ".join([str(parameters["prompt"]), *(f"<lora:{lora['name']}:{lora['scale']:g}>" for lora in loras)])
    hashes = ", ".join(f"{lora['name']}: {lora['hash']}" for lora in loras if lora.get("hash"))
    if hashes:
        fields["Lora hashes"] = hashes
    line = ", ".join(f"{key}: {_a1111_quote(str(value))}" for key, value in fields.items())
    return f"{prompt}\n{line}"


def _a1111_quote(value: str) -> str:
    """A1111 writes a value holding its separators as a JSON string."""
    return json.dumps(value, ensure_ascii=False) if any(mark in value for mark in ",:\n") else value


def read_parameters(path: Path) -> dict[str, object]:
    """The parameters `save_image` wrote into the image at `path`, read without decoding its pixels. KeyError when it
    holds none, ValueError when its Exif maker note is another program's."""
    with Image.open(path) as image:
        if image.format == "PNG":
            # Our text chunks come before the image data, where Pillow's header read already found them; `.text`
            # would decode the whole image first (~25 ms at 1024²) to look after it too.
            raw = image.info.get(PARAMETERS_KEY)
            return json.loads(raw if isinstance(raw, str) else image.text[PARAMETERS_KEY])
        # JPEG's and WebP's Exif is read with the header too (0.04 and 0.5 ms at 1024², decoding is 5 and 21 ms).
        return json.loads(image.getexif().get_ifd(EXIF_IFD)[MAKER_NOTE])


def remove_partial_files(output_dir: Path) -> int:
    """Delete temporary files a killed process left mid-write; returns how many. (They are never images: an image's
    name appears only through the final rename.)"""
    removed = 0
    for partial in output_dir.glob("*/.*.tmp"):
        partial.unlink(missing_ok=True)
        removed += 1
    return removed


def recent_images(output_dir: Path, limit: int) -> list[tuple[Path, dict[str, object]]]:
    """The newest `limit` saved images with their parameters, newest first. Day folders are read newest first and
    only until enough are found: a service running for months keeps every image it made."""
    images = []
    day_dirs = sorted((path for path in output_dir.glob("*") if path.is_dir()), key=lambda path: path.name,
                      reverse=True)
    for day_dir in day_dirs:
        saved = (path for path in day_dir.iterdir() if path.suffix in SUFFIXES.values())
        for path in sorted(saved, key=lambda path: path.stat().st_mtime, reverse=True):
            try:
                images.append((path, read_parameters(path)))
            except (OSError, KeyError, ValueError):
                continue  # not one of ours, or unreadable: leave it out of the history
            if len(images) == limit:
                return images
    return images


class RecentImages:
    """The newest `keep` saved images with their parameters, read from disk on first use and kept up to date as
    images are saved: a page load reads memory instead of every image's parameters (200 page loads at once, each
    reading the folders, slowed a running image from 0.19 s to 17.5 s). An owner whose newest image is older than
    the `keep` newest of all sees none."""

    def __init__(self, output_dir: Path, keep: int):
        self.output_dir, self.keep = output_dir, keep
        self._images: list[tuple[Path, dict[str, object]]] | None = None  # newest first
        self._lock = threading.Lock()

    def _loaded(self) -> list[tuple[Path, dict[str, object]]]:
        if self._images is None:
            self._images = recent_images(self.output_dir, self.keep)
        return self._images

    def add(self, path: Path, parameters: dict[str, object]) -> None:
        with self._lock:
            if self._images is not None:
                self._images.insert(0, (path, parameters))
                del self._images[self.keep:]

    def newest(self, limit: int, owner: str | None) -> list[tuple[Path, dict[str, object]]]:
        """The newest `limit` images saved with this owner (none for no owner), newest first; ones since deleted
        from disk are left out."""
        if owner is None:
            return []
        with self._lock:
            mine = [(path, parameters) for path, parameters in self._loaded() if parameters.get("owner") == owner]
        return list(itertools.islice(((path, parameters) for path, parameters in mine if path.exists()), limit))
