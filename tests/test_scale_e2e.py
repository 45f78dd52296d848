"""app.py --replicas on the CPU: the real front (Gradio, the OpenAI route, /readyz) over two tiny Serve replicas,
then SIGTERM. And the single-GPU default, which must never import Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.helpers import PROJECT_DIR, demo_model_with_adapters, generate_over_http, start_demo_app

pytestmark = pytest.mark.e2e

# Supervisor sends SIGKILL at stopwaitsecs after its SIGTERM (30 s as scripts/install_service.py writes it); with no
# job running, the stop must be done well before that.
STOP_WITHIN_S = 20


def test_the_single_gpu_service_never_imports_ray():
    code = ("import sys, app, webui.ui, webui.server, pipeline.engine; "
            "print('ray' in sys.modules, 'scale' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_two_replicas_serve_one_front_and_sigterm_leaves_no_process(tmp_path, tiny_models):
    pytest.importorskip("ray")
    partial = tmp_path / "outputs" / "2026-11-23" / ".a-save-killed-midway.tmp"  # by a front killed earlier
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\x89PNG half")
    demo_model_with_adapters(tmp_path, tiny_models, "ink")  # every replica reads the same adapter folder
    app = start_demo_app(tmp_path, tiny_models, "--replicas", "2", "--compile-delay", "0", own_process_group=True)
    assert not partial.exists() and "removed 1 partial image file(s)" in app.log()
    try:
        with urllib.request.urlopen(f"{app.url}/readyz", timeout=10) as response:
            ready = json.loads(response.read())
        assert ready["replicas_ready"] == 2 and ready["replicas_total"] == 2
        with urllib.request.urlopen(f"{app.url}/v1/loras", timeout=10) as response:
            assert [entry["name"] for entry in json.loads(response.read())["data"]] == ["ink"]
        # Four at once: the front's queue lets two through, one per replica; each with the adapter.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda n: generate_over_http(app.url, f"a fox number {n}",
                                                                 loras=[{"name": "ink", "scale": 0.5}]), range(4)))
        assert all(len(answer["data"]) == 1 and answer["data"][0]["b64_json"] for answer in answers)
        assert all(answer["data"][0]["loras"] == [{"name": "ink", "scale": 0.5}] for answer in answers)
        assert len(list(app.output_dir.rglob("*.png"))) == 4
        # The front's own line, written before it answers: a replica's lines reach the log through Ray's
        # asynchronous stdout forwarding and may still be on their way.
        served_by = set(re.findall(r"zimage\.remote request id=\S+ replica=(\S+) .*outcome=ok", app.log()))
        assert len(served_by) == 2, app.log()[-3000:]
        family = psutil.Process(app.process.pid).children(recursive=True)
        assert family, "a private Ray cluster runs as the front's children"
    finally:
        # As `supervisorctl stop` does (stopasgroup): SIGTERM to the whole group, the private cluster's processes too.
        stop_sent = time.monotonic()
        os.killpg(app.process.pid, signal.SIGTERM)
        exit_code = app.process.wait(timeout=60)
        stopped_in = time.monotonic() - stop_sent
    assert exit_code == 0, app.log()[-3000:]
    assert stopped_in < STOP_WITHIN_S, (stopped_in, app.log()[-3000:])
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [process.cmdline()[:3] for process in alive]
    assert "replicas shut down" in app.log()
    # Ray's own line when a thread other than the main one starts Ray: a call that reached Ray after its shutdown
    # (from a Serve handle's thread) started a new local cluster, whose worker then held the exit for 10-60 s.
    assert "current thread is not the main thread" not in app.log(), app.log()[-3000:]
