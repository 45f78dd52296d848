"""The operator scripts, run as the operator runs them: separate processes, exit codes, printed lines."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.layouts import DIT_FILE, LayoutKind, find_weights
from pipeline.manifest import MANIFEST_NAME
from tests.helpers import PROJECT_DIR, demo_model_with_adapters, start_demo_app, stop_app
from webui.resolutions import offered


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)


def _script(name: str):
    """A script of scripts/ (not a package) as a module, for its functions and constants."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", PROJECT_DIR / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def test_request_lines_are_read_with_and_without_a_serving_path(tmp_path):
    log = tmp_path / "service.log"
    log.write_text(
        "2026-11-23T17:00:33+0000 INFO zimage.engine request id=aaa prompt='size=9x9 steps=1 seed=5' size=256x256 "
        "steps=2 seed=7 shift=3 wait_ms=0 encode_ms=16 denoise_ms=69 decode_ms=157 save_ms=23 total_ms=266 "
        "outcome=ok file=outputs/a.png\n"
        "2026-11-23T17:00:34+0000 INFO zimage.engine request id=bbb prompt=len=12 sha=0355b1f7 start='a fox' "
        "size=1024x1024 steps=8 seed=8 shift=3 wait_ms=1 encode_ms=30 denoise_ms=700 decode_ms=90 save_ms=150 "
        "total_ms=971 gpu_peak_allocated_mib=21000 gpu_peak_reserved_mib=23000 path=compiled outcome=ok file=b.png\n"
        "2026-11-23T17:00:35+0000 INFO zimage.engine request id=ccc outcome=rejected reason='too big'\n")
    logged = _script("local_service").logged_requests(log)
    assert set(logged) == {7, 8}
    assert logged[7]["size"] == "256x256" and logged[7]["total_ms"] == 266 and "path" not in logged[7]
    assert logged[8]["path"] == "compiled" and logged[8]["gpu_peak_reserved_mib"] == 23000
    assert logged[8]["id"] == "bbb" and logged[8]["decode_ms"] == 90


def test_recompilations_are_counted_after_the_compiled_path_went_live(tmp_path):
    measure_service = _script("measure_service")
    recompile = "V1123 torch/_dynamo/guards.py:3000] [0/1] [__recompiles] Recompiling function forward in x.py\n"
    log = tmp_path / "service.log"
    log.write_text(recompile * 2 + "INFO zimage.engine compiled path live seconds=41.0\n" + recompile +
                   "W1123 torch._dynamo hit config.recompile_limit (8)\n")
    assert measure_service.recompilations(log) == {"recompiles_after_live": 1, "recompile_limit_hits": 1}
    log.write_text(recompile * 2)  # never live (compilation off or failed): the whole log counts
    assert measure_service.recompilations(log)["recompiles_after_live"] == 2


def test_the_mixed_run_uses_sizes_the_ui_offers_and_prompts_from_one_word_past_the_token_budget():
    measure_service = _script("measure_service")
    category_of = {label.split()[0]: category for category, labels in offered(2048, 2048).items() for label in labels}
    sizes = set(measure_service.MIXED_SIZES)
    assert len(sizes) == 6 and sizes <= category_of.keys() and len({category_of[size] for size in sizes}) == 3
    jobs = measure_service.mixed_jobs(measure_service.FreshRequests(), 30, list(measure_service.MIXED_SIZES), 2)
    words = [len(job.prompt.split()) for job in jobs]
    assert min(words) == 1 and max(words) == 600 and len({job.size for job in jobs}) == 6
    assert len({job.prompt for job in jobs}) == len({job.seed for job in jobs}) == 30


@pytest.mark.e2e
def test_measure_service_times_a_user_from_start_to_kill_9_and_leaves_nothing_running(tmp_path, tiny_models):
    demo_dir, supervisor_dir = demo_model_with_adapters(tmp_path, tiny_models, "a", "b", "c"), tmp_path / "sv"
    figures_path = tmp_path / "service.json"
    result = _run("scripts/measure_service.py", "--requests", "2", "--concurrent-clients", "2", "--per-client", "1",
                  "--mixed", "6", "--mixed-sizes", "256x256,384x256,256x384", "--size", "256x256", "--steps", "2",
                  "--adapters", "a,b,c", "--edits", "--upload-trials", "2",
                  "--kill-trials", "1", "--startsecs", "5", "--supervisor-dir", str(supervisor_dir),
                  "--log", str(tmp_path / "service.log"), "--json", str(figures_path),
                  "--", "--demo", "--demo-dir", str(demo_dir), "--output-dir", str(tmp_path / "outputs"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kill -9 → first image" in result.stdout
    figures = json.loads(figures_path.read_text())
    assert "error" not in figures
    assert figures["ready_s"] > 0 and figures["compiled"] == "off"  # the CPU runs the model eagerly
    assert figures["compiled_live_s"] >= figures["ready_s"]
    assert figures["first_request_after_ready_s"] > 0 and figures["first_request_after_live_s"] > 0
    kill, adapters = figures["kill"], figures["adapters"]
    adapter_runs = ("none", "one", "two", "switch", "mixed")
    requests = [figures["first_request_after_ready"], figures["first_request_after_live"],
                *(request for part in ("openai", "gradio", "concurrent", "mixed") for request in figures[part]["each"]),
                *(request for run in adapter_runs for request in adapters[run]["each"]), kill["trials"][0]["request"]]
    # Each request found its own log line: the engine's total lies inside the client's time.
    assert len(requests) == 1 + 1 + 2 + 2 + 2 + 6 + 2 * 4 + 20 + 1 == len({request["seed"] for request in requests})
    # Adapters as asked: the slots written once for a set held, each time for sets in turn.
    assert [request["lora_load_ms"] > 0 for request in adapters["one"]["each"]] == [True, False]
    assert all(request["lora_load_ms"] > 0 for request in adapters["switch"]["each"])
    assert all(request["lora_load_ms"] == 0 for request in adapters["none"]["each"])
    assert "adapter slots written (switch)" in result.stdout
    assert all(0 < request["engine_total_ms"] < request["client_ms"] for request in requests)
    assert {request["path"] for request in requests} == {"eager"}
    edits = figures["edits"]
    edited = [*edits["image_0.6"]["each"], *edits["inpaint"]["each"], *edits["mixed"]["each"]]
    assert len(edited) == 2 + 2 + 12 == len({request["seed"] for request in edited})
    assert all(0 < request["engine_total_ms"] < request["client_ms"] for request in edited)
    # One image more as PNG, and as JPEG and WebP: each smaller than the PNG.
    assert len(list((tmp_path / "outputs").rglob("*.png"))) == len(requests) + len(edited) + 1
    assert len(list((tmp_path / "outputs").rglob("*.jpg"))) == len(list((tmp_path / "outputs").rglob("*.webp"))) == 1
    assert edits["bytes"]["jpeg"] < edits["bytes"]["png"] and edits["bytes"]["webp"] < edits["bytes"]["png"]
    uploads = figures["uploads"]
    assert uploads["bomb"]["statuses"] == uploads["over_20_mb"]["statuses"] == {"400": 2}
    assert "50,000² bomb refused" in result.stdout
    assert figures["openai"]["b64_bytes_median"] > figures["openai"]["png_bytes_median"] > 0
    assert figures["concurrent"]["ok"] == 2 and figures["concurrent"]["errors"] == {}
    assert figures["mixed"]["words_min"] == 1 and figures["mixed"]["words_max"] == 600
    assert figures["recompiles_after_live"] == 0
    trial = kill["trials"][0]
    assert 0 < trial["ready_s"] <= trial["first_image_s"]
    # The service's own account of each start: imports, loading and warm-up inside its birth → ready, which ends
    # before the first image is back (its ready line is written as /readyz starts answering, a request takes longer).
    first_image_s = figures["ready_s"] + figures["first_request_after_ready_s"]
    for start, image_s in ((figures["start"], first_image_s), (trial["start"], trial["first_image_s"])):
        assert 0 < start["imports_s"] and 0 < start["load_s"] and 0 < start["warm_up_s"]
        assert start["imports_s"] + start["load_s"] + start["warm_up_s"] < start["process_ready_s"] < image_s
    assert "birth → ready" in result.stdout and "kill → new process born" in result.stdout
    assert kill["left_running"] == [] and kill["supervisor_pids"]
    assert not any(psutil.pid_exists(pid) for pid in kill["supervisor_pids"])
    assert not [process for process in psutil.process_iter(["cmdline"])
                if str(supervisor_dir) in " ".join(process.info["cmdline"] or [])]


def test_a_standalone_install_keeps_its_logs_and_crashes_in_its_own_dir_and_fits_startsecs_to_the_demo(tmp_path):
    root = tmp_path / "sv"
    result = subprocess.run([sys.executable, "scripts/install_service.py", "--standalone", str(root), "--no-update",
                             "--", "--demo"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    program = (root / "conf.d" / "z-image-turbo.conf").read_text()
    assert f"stdout_logfile={root}/log/z-image-turbo.log" in program
    assert f"--crash-dir {root}/crashes" in program and "startsecs=15" in program
    assert "/var/log" not in program
    real = subprocess.run([sys.executable, "scripts/install_service.py", "--standalone", str(tmp_path / "real"),
                           "--no-update"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert real.returncode == 0 and "startsecs=60" in (tmp_path / "real" / "conf.d" / "z-image-turbo.conf").read_text()


def test_profile_denoise_sorts_kernels_into_families_and_needs_a_gpu():
    """Names as an H200's profile reported them: a fused Triton kernel named after the attention it feeds is
    Inductor's, cuDNN's attention is attention (not a matrix product, though its name says sm90)."""
    family = _script("profile_denoise").family
    assert family("nvjet_sm90_tst_320x128_64x3_2x1_v_bz_coopB_TNT") == "matrix products"
    assert family("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "matrix products"
    assert family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert family("fmha_cutlassF_bf16_aligned_32x128_gmem_sm80") == "attention"
    assert family("triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_add_flip") == "Inductor fused"
    assert family("void at::native::elementwise_kernel<128, 2>") == "other"
    if not torch.cuda.is_available():
        result = _run("scripts/profile_denoise.py")
        assert result.returncode == 2 and "run it on a CUDA machine" in result.stderr


def test_measure_restart_finds_supervisorctl_on_path_when_none_is_beside_the_interpreter(tmp_path):
    """As on a GPU image whose wheels went in with pip --target: supervisor's commands are not beside python."""
    python = tmp_path / "python3"
    python.symlink_to(sys.executable)  # sys.executable is then the link, in a folder without supervisorctl
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([str(python), "-c", "import measure_restart; print(measure_restart.supervisorctl(None, "
                             "'help'))"], cwd=PROJECT_DIR / "scripts", env=environment, capture_output=True,
                            text=True, timeout=60)
    assert "default commands" in result.stdout, result.stderr
