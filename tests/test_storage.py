import os

import numpy as np
import pytest
from PIL import Image

from pipeline.storage import a1111_parameters, read_parameters, save_image


def test_png_is_whole_and_carries_its_parameters(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    parameters = {"prompt": "雪地里的猫", "seed": 2**64 - 1, "steps": 8}
    path = save_image(image, tmp_path, "stem", parameters)
    assert path.parent.parent == tmp_path and path.name == "stem.png"
    assert read_parameters(path) == parameters
    with Image.open(path) as reread:
        np.testing.assert_array_equal(np.asarray(reread), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["stem.png"]  # no temporary file left behind


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError("disk full")  # a full disk can first show here, with the temporary file already written

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (8, 8)), tmp_path, "stem", {})
    day_dirs = list(tmp_path.iterdir())
    assert day_dirs and not any(os.listdir(day_dirs[0]))


def test_partial_files_are_removed_and_history_lists_newest_first(tmp_path):
    from pipeline.storage import recent_images, remove_partial_files

    image = Image.new("RGB", (8, 8))
    older = save_image(image, tmp_path, "older", {"seed": 1})
    newer = save_image(image, tmp_path, "newer", {"seed": 2})
    saved_at = newer.stat().st_mtime
    os.utime(older, (saved_at - 1, saved_at - 1))  # a second apart, whatever the file system's clock resolution
    partial = older.parent / ".killed-midway-abc.tmp"
    partial.write_bytes(b"\x89PNG half")
    (older.parent / "foreign.png").write_bytes(b"not ours")
    assert remove_partial_files(tmp_path) == 1 and not partial.exists()
    assert [(path, params["seed"]) for path, params in recent_images(tmp_path, 10)] == [(newer, 2), (older, 1)]
    assert recent_images(tmp_path, 1) == [(newer, {"seed": 2})]


def test_kill_9_during_saves_never_leaves_a_broken_png(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from pipeline.storage import remove_partial_files

    writer = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "from pipeline.storage import save_image\n"
        "pixels = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)\n"
        "image = Image.fromarray(pixels)\n"
        "for n in range(100000):\n"
        "    save_image(image, Path(sys.argv[1]), f'img{n:06d}', {'n': n})\n"
    )
    for trial in range(8):
        process = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path)])
        time.sleep(1.5 + 0.13 * trial)  # land the kill at a different moment of a save each time
        process.send_signal(signal.SIGKILL)
        process.wait()
    remove_partial_files(tmp_path)
    saved = list(tmp_path.rglob("*.png"))
    assert saved
    for path in saved:
        with Image.open(path) as image:
            image.load()  # a truncated PNG raises here
            assert image.size == (512, 512)
        assert read_parameters(path) == {"n": int(path.stem.removeprefix("img"))}
    assert not list(tmp_path.rglob(".*.tmp"))


def test_history_reads_day_folders_newest_first(tmp_path):
    from pipeline.storage import recent_images

    image = Image.new("RGB", (8, 8))
    for day, seed in (("2026-11-20", 1), ("2026-11-22", 3), ("2026-11-21", 2)):
        (tmp_path / day).mkdir()
        path = tmp_path / day / f"seed{seed}.png"
        image.save(path, pnginfo=_info({"seed": seed}))
    assert [params["seed"] for _, params in recent_images(tmp_path, 2)] == [3, 2]
    assert [params["seed"] for _, params in recent_images(tmp_path, 10)] == [3, 2, 1]


def _info(parameters):
    import json

    from PIL.PngImagePlugin import PngInfo

    from pipeline.storage import PARAMETERS_KEY

    info = PngInfo()
    info.add_itxt(PARAMETERS_KEY, json.dumps(parameters))
    return info


def test_png_info_tools_read_the_a1111_parameters(tmp_path):
    from sd_parsers import ParserManager

    parameters = {"prompt": "一只橘猫, a ginger cat: in the snow\nsecond line", "width": 768, "height": 512, "steps": 8,
                  "seed": 4242, "shift": 3.0, "model": "Z-Image-Turbo", "guidance_scale": 0.0}
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "a1111", parameters,
                      infotext=a1111_parameters(parameters))

    info = ParserManager().parse(path)
    (sampler,) = info.samplers
    assert info.generator.name == "AUTOMATIC1111"
    assert [prompt.value for prompt in sampler.prompts] == [parameters["prompt"]]
    assert sampler.name == "Euler" and sampler.model.name == "Z-Image-Turbo"
    assert sampler.parameters["seed"] == "4242" and sampler.parameters["steps"] == "8"
    assert sampler.parameters["cfg_scale"] == "1"
    assert info.metadata["Size"] == "768x512" and info.metadata["Shift"] == "3.0"


def _photo(height=96, width=128):
    """A smooth gradient with a little grain: what a lossy encoder meets in a photo."""
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 255 / (width + height)], axis=-1)
    grain = np.random.default_rng(0).normal(0, 1.5, smooth.shape)
    return Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(("output_format", "suffix"), [("jpeg", ".jpg"), ("webp", ".webp")])
def test_jpeg_and_webp_are_whole_and_carry_their_parameters(tmp_path, output_format, suffix):
    image = _photo()
    parameters = {"prompt": "雪地里的猫 «au café» 🐈", "seed": 2**64 - 1, "steps": 8}
    path = save_image(image, tmp_path, "stem", parameters, output_format=output_format)
    assert path.parent.parent == tmp_path and path.name == f"stem{suffix}"
    data = path.read_bytes()
    if output_format == "jpeg":
        assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"  # start-of-image, end-of-image
    else:
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") == len(data) - 8
    assert read_parameters(path) == parameters
    with Image.open(path) as reread:
        assert reread.format == output_format.upper() and reread.size == image.size
        error = np.abs(np.asarray(reread.convert("RGB"), dtype=int) - np.asarray(image, dtype=int)).mean()
    assert error < 2.5  # 1.4 (JPEG) and 1.8 (WebP) at quality 90; 57 for a flat image of the mean colour
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_exif_tags_are_typed_as_a1111_reads_them(tmp_path):
    """piexif, which A1111 reads Exif with, hands back an UNDEFINED tag as bytes but a BYTE tag as a tuple of ints,
    and then cannot decode the infotext."""
    import io

    from PIL import TiffImagePlugin, TiffTags

    from pipeline.storage import EXIF_IFD, MAKER_NOTE, USER_COMMENT

    for output_format in ("jpeg", "webp"):
        path = save_image(Image.new("RGB", (8, 8)), tmp_path, output_format, {"seed": 1}, infotext="a cat\nSteps: 8",
                          output_format=output_format)
        with Image.open(path) as image:
            tiff = image.info["exif"].removeprefix(b"Exif\0\0")  # Pillow keeps the prefix of JPEG's segment only
        stream = io.BytesIO(tiff)
        first = TiffImagePlugin.ImageFileDirectory_v2(stream.read(8))
        first.load(stream)
        stream.seek(first[EXIF_IFD])
        exif = TiffImagePlugin.ImageFileDirectory_v2(tiff[:8])
        exif.load(stream)
        assert exif.tagtype == {USER_COMMENT: TiffTags.UNDEFINED, MAKER_NOTE: TiffTags.UNDEFINED}
        assert exif[USER_COMMENT] == b"UNICODE\0" + "a cat\nSteps: 8".encode("utf_16_be")


def test_info_tools_read_the_a1111_parameters_from_jpeg_and_webp(tmp_path):
    from sd_parsers import ParserManager

    saved = {}
    for output_format, seed in (("jpeg", 4242), ("webp", 4343)):
        parameters = {"prompt": "一只橘猫, a ginger cat: in the snow\nsecond line", "width": 768, "height": 512,
                      "steps": 8, "seed": seed, "shift": 3.0, "model": "Z-Image-Turbo", "guidance_scale": 0.0}
        saved[seed] = save_image(_photo(), tmp_path, output_format, parameters, infotext=a1111_parameters(parameters),
                                 output_format=output_format)

    # sd-parsers keeps the last image's Exif by id(image): both stay open, so neither can be taken for the other.
    images = {seed: Image.open(path) for seed, path in saved.items()}
    for seed, image in images.items():
        info = ParserManager().parse(image)
        (sampler,) = info.samplers
        assert info.generator.name == "AUTOMATIC1111"
        assert [prompt.value for prompt in sampler.prompts] == ["一只橘猫, a ginger cat: in the snow\nsecond line"]
        assert sampler.name == "Euler" and sampler.model.name == "Z-Image-Turbo"
        assert sampler.parameters["seed"] == str(seed) and sampler.parameters["steps"] == "8"
        assert sampler.parameters["cfg_scale"] == "1"
        assert info.metadata["Size"] == "768x512" and info.metadata["Shift"] == "3.0"
    for image in images.values():
        image.close()


def test_parameters_are_read_without_decoding_pixels(tmp_path, monkeypatch):
    from PIL import ImageFile

    paths = [save_image(_photo(), tmp_path, output_format, {"seed": 7}, output_format=output_format)
             for output_format in ("png", "jpeg", "webp")]

    def decode(image):
        raise AssertionError(f"{image.format} pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    assert [read_parameters(path) for path in paths] == [{"seed": 7}] * 3


def test_quality_sets_the_size_of_jpeg_and_webp_only(tmp_path):
    from pipeline.storage import DEFAULT_QUALITY

    image = _photo()
    for output_format in ("jpeg", "webp"):
        sizes = {quality: save_image(image, tmp_path, f"{output_format}-{quality}", {}, output_format=output_format,
                                     quality=quality).stat().st_size for quality in (30, 90, 100)}
        assert sizes[30] < 0.6 * sizes[90] < 0.6 * sizes[100]  # 0.47 and 0.24 (JPEG), 0.40 and 0.23 (WebP)
        default = save_image(image, tmp_path, f"{output_format}-default", {}, output_format=output_format)
        assert default.stat().st_size == sizes[DEFAULT_QUALITY]
    # A PNG is lossless: quality changes nothing in it.
    png = save_image(image, tmp_path, "png-default", {})
    assert save_image(image, tmp_path, "png-10", {}, quality=10).read_bytes() == png.read_bytes()


def test_unknown_format_or_quality_is_refused_before_anything_is_written(tmp_path):
    for output_format in ("gif", "PNG", "jpg"):
        with pytest.raises(ValueError, match=f"output_format must be one of png, jpeg, webp \\(got '{output_format}'"):
            save_image(Image.new("RGB", (8, 8)), tmp_path, "stem", {}, output_format=output_format)
    for quality in (-1, 101):
        with pytest.raises(ValueError, match=f"quality must be from 0 to 100 \\(got {quality}\\)"):
            save_image(Image.new("RGB", (8, 8)), tmp_path, "stem", {}, output_format="jpeg", quality=quality)
    assert not list(tmp_path.iterdir())


def test_a_jpeg_too_small_for_both_keeps_our_parameters(tmp_path):
    from pipeline.storage import EXIF_IFD, USER_COMMENT

    image = Image.new("RGB", (8, 8))
    # 30,000 characters: the JSON (30 KB) fits a JPEG's 64 KiB of Exif, not with the infotext (60 KB) beside it.
    parameters = {"prompt": "a ginger cat " * 2300, "seed": 1, "steps": 8, "width": 8, "height": 8, "shift": 3.0}
    jpeg = save_image(image, tmp_path, "long", parameters, infotext=a1111_parameters(parameters),
                      output_format="jpeg")
    assert read_parameters(jpeg) == parameters
    with Image.open(jpeg) as reread:
        assert USER_COMMENT not in reread.getexif().get_ifd(EXIF_IFD)
    # WebP's Exif has no such limit.
    webp = save_image(image, tmp_path, "long", parameters, infotext=a1111_parameters(parameters),
                      output_format="webp")
    assert read_parameters(webp) == parameters
    with Image.open(webp) as reread:
        assert USER_COMMENT in reread.getexif().get_ifd(EXIF_IFD)
    # Past 64 KiB of JSON, not even ours fits: refused, and nothing is left behind.
    longer = parameters | {"prompt": "一只橘猫" * 6000}  # 72 KB in UTF-8
    with pytest.raises(ValueError, match="a JPEG's Exif holds at most 65533. Shorten the prompt or save as png"):
        save_image(image, tmp_path, "longer", longer, output_format="jpeg")
    assert sorted(p.name for p in jpeg.parent.iterdir()) == ["long.jpg", "long.webp"]


def test_history_lists_every_format_newest_first(tmp_path):
    from pipeline.storage import recent_images

    image = Image.new("RGB", (8, 8))
    saved = [save_image(image, tmp_path, f"{seed}-{output_format}", {"seed": seed}, output_format=output_format)
             for seed, output_format in enumerate(("webp", "png", "jpeg", "png", "webp"))]
    saved_at = saved[-1].stat().st_mtime
    for seed, path in enumerate(saved):
        os.utime(path, (saved_at - 5 + seed, saved_at - 5 + seed))  # a second apart, whatever the clock's resolution
    Image.new("RGB", (8, 8)).save(saved[0].parent / "camera.jpg")  # a JPEG without our parameters: left out
    (saved[0].parent / "broken.webp").write_bytes(b"RIFF half")
    assert [(path, params["seed"]) for path, params in recent_images(tmp_path, 10)] == [
        (saved[4], 4), (saved[3], 3), (saved[2], 2), (saved[1], 1), (saved[0], 0)]
    assert [params["seed"] for _, params in recent_images(tmp_path, 2)] == [4, 3]


def test_recent_images_reads_the_disk_once_then_keeps_up_with_saves_per_owner(tmp_path):
    from pipeline.storage import RecentImages

    image = Image.new("RGB", (8, 8))
    alices = save_image(image, tmp_path, "alice-1", {"seed": 1, "owner": "alice"})
    bobs = save_image(image, tmp_path, "bob-1", {"seed": 2, "owner": "bob"})
    save_image(image, tmp_path, "nobody", {"seed": 3})
    recent = RecentImages(tmp_path, keep=10)
    assert recent.newest(10, "alice") == [(alices, {"seed": 1, "owner": "alice"})]
    assert recent.newest(10, "bob") == [(bobs, {"seed": 2, "owner": "bob"})]
    assert recent.newest(10, None) == [] and recent.newest(10, "carol") == []

    # Saved after the first read: known without reading the disk again (a file written behind its back is not).
    newer = save_image(image, tmp_path, "alice-2", {"seed": 4, "owner": "alice"})
    recent.add(newer, {"seed": 4, "owner": "alice"})
    save_image(image, tmp_path, "behind-its-back", {"seed": 5, "owner": "alice"})
    assert [params["seed"] for _, params in recent.newest(10, "alice")] == [4, 1]
    assert [params["seed"] for _, params in recent.newest(1, "alice")] == [4]
    # An image deleted from disk leaves the gallery.
    alices.unlink()
    assert [params["seed"] for _, params in recent.newest(10, "alice")] == [4]


def test_recent_images_keeps_only_the_newest(tmp_path):
    from pipeline.storage import RecentImages

    recent = RecentImages(tmp_path, keep=3)
    image = Image.new("RGB", (8, 8))
    recent.newest(1, "x")  # the first read: an empty folder
    for seed in range(5):
        parameters = {"seed": seed, "owner": "x"}
        recent.add(save_image(image, tmp_path, f"image-{seed}", parameters), parameters)
    assert [params["seed"] for _, params in recent.newest(10, "x")] == [4, 3, 2]
