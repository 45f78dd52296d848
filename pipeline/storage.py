"""Saving images so that a file on disk is always a whole PNG carrying its generation parameters."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.png import Text, encode_png

PARAMETERS_KEY = "zimage-turbo"  # PNG text chunk holding the generation parameters as JSON
A1111_KEY = "parameters"  # the text chunk AUTOMATIC1111's web UI writes, which PNG-info tools read


def save_png(image: Image.Image, output_dir: Path, stem: str, parameters: dict[str, object],
             infotext: str = "") -> Path:
    """Write `image` under `output_dir/YYYY-MM-DD/` and return its path. `parameters` go in as JSON; `infotext`, if
    given, as A1111's `parameters` chunk (see `a1111_parameters`).

    Written to a temporary file, fsynced, then renamed: a crash at any moment leaves either no file or a whole one.
    """
    day_dir = output_dir / datetime.now().strftime("%Y-%m-%d")
    day_dir.mkdir(parents=True, exist_ok=True)
    texts = [Text(PARAMETERS_KEY, json.dumps(parameters, ensure_ascii=False, sort_keys=True), utf8=True)]
    if infotext:
        texts.append(Text(A1111_KEY, infotext))  # tEXt, or iTXt when the prompt is not Latin-1
    encoded = encode_png(np.asarray(image), texts)
    target = day_dir / f"{stem}.png"
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


def a1111_parameters(parameters: dict[str, object]) -> str:
    """AUTOMATIC1111's infotext: the prompt, then one line of `Key: value` pairs. Z-Image-Turbo runs without
    guidance, which that format writes as CFG scale 1; the flow-matching Euler sampler is A1111's "Euler"."""
    fields = {
        "Steps": parameters["steps"], "Sampler": "Euler", "Schedule type": "Simple",
        "CFG scale": 1, "Seed": parameters["seed"],
        "Size": f"{parameters['width']}x{parameters['height']}", "Model": parameters.get("model", ""),
        "Shift": parameters["shift"],
    }
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
    with Image.open(path) as image:
        # Our text chunks come before the image data, where Pillow's header read already found them; `.text`
        # would decode the whole image first (~25 ms at 1024²) to look after it too.
        raw = image.info.get(PARAMETERS_KEY)
        return json.loads(raw if isinstance(raw, str) else image.text[PARAMETERS_KEY])


def remove_partial_files(output_dir: Path) -> int:
    """Delete temporary files a killed process left mid-write; returns how many. (They are never PNGs: a PNG name
    appears only through the final rename.)"""
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
        for path in sorted(day_dir.glob("*.png"), key=lambda path: path.stat().st_mtime, reverse=True):
            try:
                images.append((path, read_parameters(path)))
            except (OSError, KeyError, ValueError):
                continue  # not one of ours, or unreadable: leave it out of the history
            if len(images) == limit:
                return images
    return images


class RecentImages:
    """The newest `keep` saved images with their parameters, read from disk on first use and kept up to date as
    images are saved: a page load reads memory instead of every PNG's text chunk (200 page loads at once, each
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
