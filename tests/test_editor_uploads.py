import io
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.requests import RequestError
from tests.helpers import bomb
from webui.editor_uploads import FILES_AN_UPLOAD, ROOM_IN_UPLOADS, UploadFolder

BOUNDARY = b"zimage-test-boundary"
FORM = f"multipart/form-data; boundary={BOUNDARY.decode()}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _stored(folder, name: str, data: bytes) -> str:
    """A file as Gradio's upload route leaves it: in a folder of its own, named by its hash."""
    directory = folder / f"{abs(hash(data)):x}"
    directory.mkdir(exist_ok=True)
    (directory / name).write_bytes(data)
    return str(directory / name)


def _editor(folder, picture: Image.Image, layer: Image.Image | None) -> dict:
    """The image editor's raw value, its files in `folder`."""
    return {"background": {"path": _stored(folder, "background.png", _png(picture))},
            "layers": [] if layer is None else [{"path": _stored(folder, "layer_0.png", _png(layer))}],
            "composite": {"path": _stored(folder, "composite.png", _png(picture))}}


def _form(*files: tuple[str, bytes]) -> bytes:
    parts = [b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; filename="' + name.encode()
             + b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n" for name, data in files]
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


@pytest.fixture
def folder(tmp_path):
    uploads = tmp_path / "gradio-temp"
    uploads.mkdir()
    return uploads


def _files(folder) -> list:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_a_painted_stroke_is_the_region_to_repaint_and_every_file_is_deleted_once_read(folder):
    layer = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 90), (4, 2, 10, 8))  # any opacity counts as painted
    forgotten = []
    read = UploadFolder(folder, max_bytes=10**6, max_pixels=10**6).read(
        _editor(folder, Image.new("RGB", (32, 16), (200, 40, 30)), layer), forgotten.append)
    assert read.image.shape == (16, 32, 3) and tuple(read.image[0, 0]) == (200, 40, 30)
    expected = np.zeros((16, 32), np.uint8)
    expected[2:8, 4:10] = 255
    np.testing.assert_array_equal(read.mask, expected)
    assert _files(folder) == [] and not list(folder.iterdir())  # the files and their folders
    assert sorted(os.path.basename(name) for name in forgotten) == ["background.png", "composite.png", "layer_0.png"]


def test_a_picture_with_nothing_painted_is_edited_whole(folder):
    clear = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    for layer in (clear, None):
        read = UploadFolder(folder, max_bytes=10**6, max_pixels=10**6).read(
            _editor(folder, Image.new("RGB", (32, 16), "blue"), layer))
        assert read.mask is None


def test_paths_outside_the_upload_folder_are_never_read(folder, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(Image.new("RGB", (8, 8), "green")))
    (folder / "link.png").symlink_to(outside)
    uploads = UploadFolder(folder, max_bytes=10**6, max_pixels=10**6)
    for name in (str(outside), str(folder / ".." / "secret.png"), str(folder / "link.png"), "secret.png", "",
                 str(folder), "/etc/passwd", None, 7):
        with pytest.raises(RequestError) as refused:
            uploads.read({"background": {"path": name}, "layers": []})
        assert refused.value.field == "image"
    assert outside.exists()  # nothing outside the folder is deleted either


def test_what_is_not_a_picture_or_a_layer_of_another_size_is_refused_naming_the_field(folder):
    uploads = UploadFolder(folder, max_bytes=10**6, max_pixels=10**6)
    with pytest.raises(RequestError) as refused:
        uploads.read(None)
    assert refused.value.field == "image" and "Upload or paste a picture" in str(refused.value)
    not_a_picture = {"background": {"path": _stored(folder, "background.png", b"<html></html>")}}
    with pytest.raises(RequestError) as refused:
        uploads.read(not_a_picture)
    assert refused.value.field == "image"
    wrong_size = _editor(folder, Image.new("RGB", (32, 16)), Image.new("RGBA", (16, 16), (255, 255, 255, 255)))
    with pytest.raises(RequestError) as refused:
        uploads.read(wrong_size)
    assert refused.value.field == "mask" and "32×16" in str(refused.value)
    assert _files(folder) == []  # refused or not, what the value named is deleted


def test_a_bomb_among_the_uploads_is_refused_from_its_header(folder):
    with pytest.raises(RequestError) as refused:
        UploadFolder(folder, max_bytes=10**6, max_pixels=50 * 10**6).read(
            {"background": {"path": _stored(folder, "background.png", bomb())}})
    assert refused.value.field == "image" and "megapixels" in str(refused.value)


def test_an_upload_body_may_hold_only_pictures_within_the_limit():
    uploads = UploadFolder(None, max_bytes=1000, max_pixels=10**6)
    picture = _png(Image.new("RGB", (4, 4)))
    assert uploads.body_problem(FORM, _form(("a.png", picture))) is None
    assert "not a PNG, JPEG or WebP" in uploads.body_problem(FORM, _form(("a.png", b"GIF89a....")))
    assert "not a PNG, JPEG or WebP" in uploads.body_problem(FORM, _form(("x.html", b"")))
    assert "larger than the limit" in uploads.body_problem(FORM, _form(("a.png", picture + b"0" * 1000)))
    assert "1 to 3 files" in uploads.body_problem(FORM, _form(*[("a.png", picture)] * (FILES_AN_UPLOAD + 1)))
    field = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--' + BOUNDARY + b"--\r\n"
    assert "nothing else" in uploads.body_problem(FORM, field)
    assert "multipart/form-data" in uploads.body_problem("application/json", b"{}")
    assert uploads.body_problem(FORM, _form(("a.png", picture))[:-10]) is not None  # cut short


def test_left_over_uploads_are_swept_and_a_full_folder_refuses_more(folder, caplog):
    uploads = UploadFolder(folder, max_bytes=100, max_pixels=10**6, left_over_s=3600)
    for number in range(ROOM_IN_UPLOADS):
        _stored(folder, f"{number}.png", bytes([number]) * 100)
    assert uploads.room_problem() is None  # exactly full
    _stored(folder, "one-more.png", b"x")
    with caplog.at_level(logging.INFO, logger="zimage.webui"):
        assert "try again" in uploads.room_problem()
        assert "try again" in uploads.room_problem()
    assert [record.message.split(":")[0] for record in caplog.records] == ["uploads refused"]  # once, not per upload
    forgotten = []
    time.sleep(0.01)
    assert UploadFolder(folder, max_bytes=100, max_pixels=10**6, left_over_s=0).room_problem(forgotten.append) is None
    assert _files(folder) == [] and len(forgotten) == ROOM_IN_UPLOADS + 1
