"""The operator scripts, run as the operator runs them: separate processes, exit codes, printed lines."""

import subprocess
import sys

from pipeline.layouts import DIT_FILE, LayoutKind, find_weights
from pipeline.manifest import MANIFEST_NAME
from tests.conftest import PROJECT_DIR


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)


def test_make_tiny_model_writes_each_layout(tmp_path):
    for layout in LayoutKind:
        out = tmp_path / layout.value
        result = _run("scripts/make_tiny_model.py", "--layout", layout.value, str(out))
        assert result.returncode == 0, result.stderr
        assert find_weights(out).kind is layout and (out / MANIFEST_NAME).is_file()


def test_make_tiny_model_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = _run("scripts/make_tiny_model.py", str(tmp_path))
    assert result.returncode == 1 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_verify_passes_on_a_whole_copy_and_names_a_truncated_file(tiny_copy):
    root = tiny_copy(LayoutKind.SINGLE_FILE)
    ok = _run("scripts/fetch_weights.py", "--verify", str(root))
    assert ok.returncode == 0 and "OK" in ok.stdout
    with (root / DIT_FILE).open("r+b") as handle:
        handle.truncate(1000)
    bad = _run("scripts/fetch_weights.py", "--verify", str(root))
    assert bad.returncode == 1
    assert f"FAIL {root / DIT_FILE}: 1000 bytes" in bad.stdout


def test_write_manifest_then_verify(tiny_copy):
    root = tiny_copy(LayoutKind.DIFFUSERS)
    (root / MANIFEST_NAME).unlink()
    assert _run("scripts/fetch_weights.py", "--verify", str(root)).returncode == 1
    written = _run("scripts/fetch_weights.py", "--write-manifest", str(root))
    assert written.returncode == 0, written.stdout
    assert _run("scripts/fetch_weights.py", "--verify", str(root)).returncode == 0


def test_write_manifest_refuses_a_directory_without_weights(tmp_path):
    result = _run("scripts/fetch_weights.py", "--write-manifest", str(tmp_path))
    assert result.returncode == 1 and "no Z-Image-Turbo weights" in result.stdout
