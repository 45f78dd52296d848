import os

import numpy as np
import pytest
from PIL import Image

from pipeline.storage import a1111_parameters, read_parameters, save_png


def test_png_is_whole_and_carries_its_parameters(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    parameters = {"prompt": "雪地里的猫", "seed": 2**64 - 1, "steps": 8}
    path = save_png(image, tmp_path, "stem", parameters)
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
        save_png(Image.new("RGB", (8, 8)), tmp_path, "stem", {})
    day_dirs = list(tmp_path.iterdir())
    assert day_dirs and not any(os.listdir(day_dirs[0]))


def test_partial_files_are_removed_and_history_lists_newest_first(tmp_path):
    from pipeline.storage import recent_images, remove_partial_files

    image = Image.new("RGB", (8, 8))
    older = save_png(image, tmp_path, "older", {"seed": 1})
    newer = save_png(image, tmp_path, "newer", {"seed": 2})
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
        "from pipeline.storage import save_png\n"
        "pixels = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)\n"
        "image = Image.fromarray(pixels)\n"
        "for n in range(100000):\n"
        "    save_png(image, Path(sys.argv[1]), f'img{n:06d}', {'n': n})\n"
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
    path = save_png(Image.new("RGB", (8, 8)), tmp_path, "a1111", parameters, infotext=a1111_parameters(parameters))

    info = ParserManager().parse(path)
    (sampler,) = info.samplers
    assert info.generator.name == "AUTOMATIC1111"
    assert [prompt.value for prompt in sampler.prompts] == [parameters["prompt"]]
    assert sampler.name == "Euler" and sampler.model.name == "Z-Image-Turbo"
    assert sampler.parameters["seed"] == "4242" and sampler.parameters["steps"] == "8"
    assert sampler.parameters["cfg_scale"] == "1"
    assert info.metadata["Size"] == "768x512" and info.metadata["Shift"] == "3.0"


def test_recent_images_reads_the_disk_once_then_keeps_up_with_saves_per_owner(tmp_path):
    from pipeline.storage import RecentImages

    image = Image.new("RGB", (8, 8))
    alices = save_png(image, tmp_path, "alice-1", {"seed": 1, "owner": "alice"})
    bobs = save_png(image, tmp_path, "bob-1", {"seed": 2, "owner": "bob"})
    save_png(image, tmp_path, "nobody", {"seed": 3})
    recent = RecentImages(tmp_path, keep=10)
    assert recent.newest(10, "alice") == [(alices, {"seed": 1, "owner": "alice"})]
    assert recent.newest(10, "bob") == [(bobs, {"seed": 2, "owner": "bob"})]
    assert recent.newest(10, None) == [] and recent.newest(10, "carol") == []

    # Saved after the first read: known without reading the disk again (a file written behind its back is not).
    newer = save_png(image, tmp_path, "alice-2", {"seed": 4, "owner": "alice"})
    recent.add(newer, {"seed": 4, "owner": "alice"})
    save_png(image, tmp_path, "behind-its-back", {"seed": 5, "owner": "alice"})
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
        recent.add(save_png(image, tmp_path, f"image-{seed}", {"seed": seed, "owner": "x"}), {"seed": seed,
                                                                                             "owner": "x"})
    assert [params["seed"] for _, params in recent.newest(10, "x")] == [4, 3, 2]
