"""The operator scripts, run as the operator runs them: separate processes, exit codes, printed lines."""

import json
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


def test_fault_mix_run_counts_the_injected_errors_and_nothing_exits(tmp_path):
    figures_path = tmp_path / "mix.json"
    result = _run("scripts/soak.py", "--requests", "20", "--size", "128", "--steps", "2", "--fault", "oom@1/10",
                  "--json", str(figures_path))
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(figures_path.read_text())
    assert figures["process_exits"] == 0 and figures["images_on_disk"] == 18
    assert figures["outcomes"]["ok"] == 18
    assert sum(count for kind, count in figures["outcomes"].items() if "Out of GPU memory" in kind) == 2
    assert figures["fds_final"] <= figures["fds_after_warm_up"] + 2


def test_loadtest_reports_throughput_latency_and_efficiency(tmp_path, tiny_models):
    from tests.test_app_e2e import start_demo_app, stop_app

    app = start_demo_app(tmp_path, tiny_models)
    try:
        figures_path = tmp_path / "load.json"
        result = _run("scripts/loadtest.py", "--url", app.url, "--clients", "2", "--requests", "3", "--size", "128",
                      "--steps", "2", "--single-runs", "1", "--json", str(figures_path))
        assert result.returncode == 0, result.stdout + result.stderr
        figures = json.loads(figures_path.read_text())
        assert figures["ok"] == 6 and figures["errors"] == {}
        assert figures["throughput_per_s"] > 0 and figures["p95_s"] >= figures["p50_s"] > 0
        assert 0 < figures["efficiency"] < 2
    finally:
        stop_app(app)


def test_loadtest_only_targets_loopback():
    result = _run("scripts/loadtest.py", "--url", "http://10.0.0.5:7860", "--requests", "1")
    assert result.returncode == 2 and "loopback" in result.stderr
