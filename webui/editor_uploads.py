"""The pictures the page's image editor sends: Gradio's upload route writes each file (the picture, its brush layers,
their composite) into the service's private temp dir before the edit event names them by path. This module is the
only reader of that folder: an event's paths are taken only from inside it, each file is checked as the OpenAI
route's uploads are (pipeline.uploads), and every file is deleted once its edit has read it. The folder's room is
bounded, and the file route never serves it (webui.gradio_surface)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.requests import RequestError, shown
from pipeline.uploads import ACCEPTED, MB, picture_format, read_image, read_mask, read_painted
from webui.multipart import FormError, boundary_of, read_form

log = logging.getLogger("zimage.webui")

# The folder holds at most this many uploads at the size limit: a page sends three files an edit and two more each
# brush stroke, and a client that uploads and never edits fills it only this far.
ROOM_IN_UPLOADS = 100
# An upload no edit has read within this long is left over, deleted at the next upload: the page's editor uploads
# its layer and composite again after each brush stroke, not only when Edit is clicked (an edit reads its files
# within seconds), and a tab may close unedited.
LEFT_OVER_S = 120.0
Forget = Callable[[str], None]
FILES_AN_UPLOAD = 3  # the editor sends one file a request; gradio_client sends an edit's files together
DECODES_AT_ONCE = 2  # the page's edits decoded at once: each picture up to the pixel limit, as RGB in memory


@dataclass(frozen=True)
class EditorPicture:
    """What an edit event sent, read: the picture, and where its brush layers are painted (None: nowhere)."""

    image: np.ndarray  # RGB uint8 (height, width, 3)
    mask: np.ndarray | None  # uint8 (height, width), 255 where to repaint


class UploadFolder:
    """Gradio's upload folder (`folder`), as the edit event reads it: files of at most `max_bytes` each, pictures
    of at most `max_pixels`, ROOM_IN_UPLOADS of them at the size limit in all. Each method that deletes uploads
    tells `forget(name)` of each, by the name Gradio gave it (webui.gradio_surface.forget_upload)."""

    def __init__(self, folder: Path, *, max_bytes: int, max_pixels: int, left_over_s: float = LEFT_OVER_S):
        self.folder = folder
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.room_bytes = ROOM_IN_UPLOADS * max_bytes
        self.left_over_s = left_over_s
        self._full = False  # as the last check found it: the log says when that changes, not at every upload

    def room_problem(self, forget: Forget = lambda _name: None) -> str | None:
        """Why a new upload cannot be taken now (None: it can): the folder is full once its left-over files are
        deleted."""
        now, held = time.time(), 0
        for path, size, changed in self._files():
            if now - changed > self.left_over_s:
                _delete(path, self.folder)
                forget(str(path))
            else:
                held += size
        full = held > self.room_bytes
        if full != self._full:
            self._full = full
            if full:
                log.warning("uploads refused: the upload folder %s holds %d MB of the %d MB it may (uploads no edit "
                            "read are deleted after %.0f s)", self.folder, held // 10**6, self.room_bytes // 10**6,
                            self.left_over_s)
            else:
                log.info("uploads taken again: the upload folder holds %d MB", held // 10**6)
        if not full:
            return None
        return (f"the server holds {self.room_bytes // 10**6} MB of pictures waiting for their edits; try again in "
                f"a minute")

    def body_problem(self, content_type: str, body: bytes) -> str | None:
        """Why an upload's body is not one Gradio's route may store (None: it may): a form of at most
        FILES_AN_UPLOAD files, each a PNG, JPEG or WebP by its first bytes and of at most the size limit. The
        route takes nothing else, so it cannot be used to leave other files on the server."""
        boundary = boundary_of(content_type)
        if boundary is None:
            return "an upload must be a multipart/form-data form"
        try:
            parts = read_form(body, boundary)
        except FormError as error:
            return str(error)
        if not parts or len(parts) > FILES_AN_UPLOAD or any(part.filename is None for part in parts):
            return f"an upload is a form of 1 to {FILES_AN_UPLOAD} files and nothing else"
        for part in parts:
            data = part.data
            if len(data) > self.max_bytes:
                return f"{shown(part.filename)} is larger than the limit of {self.max_bytes / MB:g} MB"
            if picture_format(bytes(data[:12])) is None:
                return f"{shown(part.filename)} is not a {ACCEPTED} picture (by its content)"
        return None

    def read(self, value: object, forget: Forget = lambda _name: None) -> EditorPicture:
        """The picture and brush mask of the image editor's raw value ({"background": {"path": ...}, "layers":
        [...], "composite": ...}); RequestError naming the field for anything amiss. Every file the value names in
        the folder is deleted, read or not."""
        named = self._paths(value)
        try:
            if not isinstance(value, dict) or not isinstance(value.get("background"), dict):
                raise RequestError("Upload or paste a picture to edit first (or pick one in the gallery and click "
                                   "“Edit this image”).", "image")
            image = read_image(self._bytes(value["background"], "image"), "image", max_bytes=self.max_bytes,
                               max_pixels=self.max_pixels)
            size = (image.shape[1], image.shape[0])
            layers = value.get("layers") or []
            if not isinstance(layers, list):
                raise RequestError(f"layers must be a list of the editor's layers (got {shown(layers)}).", "mask")
            mask = None
            for layer in layers:
                painted = read_painted(self._bytes(layer, "mask"), "mask", size, max_bytes=self.max_bytes,
                                       max_pixels=self.max_pixels)
                mask = painted if mask is None else np.maximum(mask, painted)
            return EditorPicture(image=image, mask=mask if mask is not None and mask.any() else None)
        finally:
            for name, path in named:
                _delete(path, self.folder)
                forget(name)

    def read_files(self, image: object, mask: object, forget: Forget = lambda _name: None) -> EditorPicture:
        """An API call's picture and mask, files gradio_client uploaded (FileData: {"path": ...}; mask None for
        image-to-image), read as the OpenAI route reads them: the mask's transparent pixels are repainted. Both
        files are deleted, read or not."""
        named = [(file["path"], path) for file in (image, mask) if isinstance(file, dict)
                 and (path := self._inside(file.get("path"))) is not None]
        try:
            picture = read_image(self._bytes(image, "image"), "image", max_bytes=self.max_bytes,
                                 max_pixels=self.max_pixels)
            if mask is None:
                return EditorPicture(image=picture, mask=None)
            return EditorPicture(image=picture, mask=read_mask(
                self._bytes(mask, "mask"), "mask", (picture.shape[1], picture.shape[0]), max_bytes=self.max_bytes,
                max_pixels=self.max_pixels))
        finally:
            for name, path in named:
                _delete(path, self.folder)
                forget(name)

    def _bytes(self, file: object, field: str) -> bytes:
        path = self._inside(file.get("path") if isinstance(file, dict) else None)
        if path is None:
            raise RequestError(f"{field} must be a picture uploaded to this server (the page's editor, or "
                               f"gradio_client's handle_file); upload it again.", field)
        try:
            with path.open("rb") as opened:
                data = opened.read(self.max_bytes + 1)  # one byte over is enough to refuse it
        except OSError:
            raise RequestError(f"{field} is no longer on the server (an edit reads each upload once); upload it "
                               f"again.", field) from None
        return data

    def _inside(self, name: object) -> Path | None:
        """`name` as a path of a file in the folder, links resolved; None for any other."""
        if not isinstance(name, str) or not name or "\x00" in name:
            return None
        path = Path(os.path.realpath(name))
        return path if path.is_relative_to(os.path.realpath(self.folder)) and path.is_file() else None

    def _paths(self, value: object) -> list[tuple[str, Path]]:
        """(name, path) of each file in the folder that the editor's value names."""
        if not isinstance(value, dict):
            return []
        layers = value.get("layers") if isinstance(value.get("layers"), list) else []
        files = [value.get("background"), *layers, value.get("composite")]
        return [(file["path"], path) for file in files if isinstance(file, dict)
                and (path := self._inside(file.get("path"))) is not None]

    def _files(self) -> list[tuple[Path, int, float]]:
        """Each file in the folder: (path, bytes, when it last changed)."""
        found = []
        for directory, _, names in os.walk(self.folder):
            for name in names:
                try:
                    status = os.lstat(os.path.join(directory, name))
                except OSError:
                    continue
                found.append((Path(directory, name), status.st_size, status.st_ctime))
        return found


def _delete(path: Path, folder: Path) -> None:
    """`path`, and its folder when that is now empty and not `folder` itself (Gradio puts each upload in one of its
    own, named by the file's hash)."""
    try:
        path.unlink()
    except OSError:
        return
    if os.path.realpath(path.parent) != os.path.realpath(folder):
        try:
            path.parent.rmdir()
        except OSError:
            pass  # another upload of the same content is in it
