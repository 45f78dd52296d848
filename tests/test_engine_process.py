"""The engine in its own process: started, killed and restarted for real (spawned processes on the tiny model), then
against a real `app.py --demo`: kill -9 of the engine with one job running and four waiting, /healthz answering
throughout; kill -9 of the front leaving no engine behind."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from PIL import Image

from pipeline.engine_process import EngineRestarting, ProcessEngine
from pipeline.engine_events import EngineSpec
from pipeline.engine_spawn import spawn_engine_process
from pipeline.faults import FaultPlan
from pipeline.layouts import LayoutKind
from pipeline.messages import StartupError
from pipeline.metrics import ServiceMetrics
from pipeline.requests import GenerationRequest, RequestError
from tests.helpers import (
    PROJECT_DIR,
    engine_options,
    http_status,
    multipart_body,
    parse_samples,
    post_json,
    post_request,
    raw_exchange,
    start_demo_app,
    stop_app,
    wait_until,
)

# A prompt the engine process stalls on (the "slow" fault: a step that never ends) after reporting its first step,
# so a test can kill the engine process while it holds a request it has begun.
STALLS = "a request that stalls at its second step"


def _spec(model_dir, tmp_path, **overrides) -> EngineSpec:
    return EngineSpec(model_dir=model_dir, device="cpu", options=engine_options(tmp_path / "outputs", **overrides),
                      crash_dir=tmp_path / "crash", faults=FaultPlan("slow", step=2, prompt=STALLS))


def _engine_processes(parent: psutil.Process) -> list[psutil.Process]:
    """The live engine processes multiprocessing spawned (not its resource tracker)."""
    found = []
    for child in parent.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:  # gone, or a zombie not yet reaped
            pass
    return found


@pytest.fixture(scope="module")
def first_engine_process():
    """Started before the ProcessEngine that serves from it, as app.py starts it."""
    return spawn_engine_process()


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory, first_engine_process):
    engine = ProcessEngine(_spec(tiny_models[LayoutKind.SINGLE_FILE], tmp_path_factory.mktemp("engine")),
                           metrics=ServiceMetrics(), first=first_engine_process)
    engine.start()
    yield engine
    engine.close()


def test_it_serves_from_another_process_with_a_standby_beside_it(engine, first_engine_process):
    result = engine.generate(GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=1, seed=3))
    assert result.path.is_file() and result.request.seed == 3 and engine.served == 1
    assert engine.status().ready and engine.status().device == "cpu" and engine.worker.pid != os.getpid()
    assert engine.worker.pid == first_engine_process.process.pid
    wait_until(lambda: len(_engine_processes(psutil.Process())) == 2, 60, "a standby beside the engine process")
    with pytest.raises(RequestError) as refused:
        engine.generate(GenerationRequest(prompt="", width=64, height=64, steps=1))
    assert refused.value.field == "prompt"  # the engine's own error, its field kept across the pipe


def test_a_killed_engine_fails_the_request_it_held_and_the_next_one_runs_on_its_successor(engine):
    killed_pid = engine.worker.pid
    outcome = {}
    begun = threading.Event()  # a step reported: the engine process holds the job, not merely its pipe

    def stalled():
        try:
            engine.generate(GenerationRequest(prompt=STALLS, width=64, height=64, steps=3),
                            progress=lambda step, total: begun.set())
        except Exception as error:  # noqa: BLE001 (the test reads which)
            outcome["error"] = error

    holder = threading.Thread(target=stalled)
    holder.start()
    assert begun.wait(30), "the engine process never began the request"
    assert engine.running_jobs == 1 and engine.status().in_flight.startswith("engine-1/")
    os.kill(killed_pid, signal.SIGKILL)
    holder.join(timeout=30)
    assert isinstance(outcome.get("error"), EngineRestarting) and "signal=SIGKILL" in str(outcome["error"])
    # Sent while the next engine process starts: it waits for it.
    result = engine.generate(GenerationRequest(prompt="after the restart", width=64, height=64, steps=1))
    assert result.path.is_file() and engine.restarts == 1 and engine.worker.pid != killed_pid
    assert engine.worker.id == "engine-2" and engine.status().restarting is None


def test_a_job_sent_as_the_engine_dies_was_never_begun_and_runs_on_the_next_one(engine, caplog):
    """Sent in the moment between an engine process's death and the front hearing of it: the job was waiting, not
    running, and waits on for the next engine process instead of failing."""
    frozen = psutil.Process(engine.worker.pid)
    restarts = engine.restarts
    frozen.suspend()  # it takes no job now, though its pipe accepts one
    outcome = {}

    def send():
        try:
            outcome["result"] = engine.generate(GenerationRequest(prompt="sent as it died", width=64, height=64,
                                                                  steps=1))
        except Exception as error:  # noqa: BLE001 (the test reads which)
            outcome["error"] = error

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: (engine.status().in_flight or "").startswith(f"{engine.worker.id}/"), 30,
               "the job sent to the frozen engine process")
    frozen.kill()
    sender.join(timeout=60)
    assert "error" not in outcome, outcome
    assert outcome["result"].path.is_file() and engine.restarts == restarts + 1 and engine.worker.pid != frozen.pid
    assert re.search(rf"engine process exited number=\d+ pid={frozen.pid} signal=SIGKILL after it was ready "
                     rf"requests_lost=0 requests_waiting=1", caplog.text)


def test_an_engine_that_cannot_start_is_a_startup_error_with_its_exit_code(tiny_models, tmp_path):
    engine = ProcessEngine(_spec(tmp_path / "no-such-model", tmp_path))
    with pytest.raises(StartupError) as failed:
        engine.start()
    assert "no-such-model" in str(failed.value) and failed.value.exit_code == 1
    engine.close()


def test_engines_that_keep_dying_at_start_end_the_service_non_zero(tiny_models, tmp_path):
    """After a first good start the weights go missing: each new engine process fails to load, and after
    MAX_FAILED_STARTS of them, backing off between, the process exits 1 (supervisord's startretries take over)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models[LayoutKind.SINGLE_FILE], model)
    script = (f"import os, shutil, signal, time\n"
              f"from pipeline.engine_process import ProcessEngine\n"
              f"from pipeline.engine_events import EngineSpec\n"
              f"from tests.helpers import engine_options\n"
              f"from pathlib import Path\n"
              f"spec = EngineSpec(model_dir=Path({str(model)!r}), device='cpu', crash_dir=Path({str(tmp_path)!r}),\n"
              f"                  options=engine_options(Path({str(tmp_path / 'outputs')!r})))\n"
              f"engine = ProcessEngine(spec, max_failed_starts=2)\n"
              f"engine.start()\n"
              f"shutil.rmtree(spec.model_dir)\n"
              f"os.kill(engine.worker.pid, signal.SIGKILL)\n"
              f"time.sleep(60)\n")
    ran = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert "engine process failed to start 2 times in a row" in ran.stderr, ran.stderr[-3000:]
    assert ran.stderr.count("engine process exited") == 3  # the killed one, then two that failed to load


# -- against a real app.py --demo --------------------------------------------------------------------------------

def _generate(app, prompt: str, size: str = "64x64", steps: int = 1) -> tuple[int, dict]:
    status, answer = post_json(app, "/v1/images/generations", {"prompt": prompt, "size": size, "steps": steps,
                                                               "response_format": "url"})
    return status, json.loads(answer)


def _readyz(app) -> dict:
    try:
        with urllib.request.urlopen(f"{app.url}/readyz", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def _engine_of(app) -> int:
    """The pid of the app's running engine process, from its log (not its standby's)."""
    return int(re.findall(r"zimage\.engine_process engine process ready number=\d+ pid=(\d+) ", app.log())[-1])


# Loaded by every Python process of the app below (PYTHONPATH): notes, per process, which of the model libraries
# it imports.
IMPORT_WATCH = """\
import os, sys

class _ModelLibraries:
    def find_spec(self, name, path=None, target=None):
        if name in ("diffusers", "transformers"):
            with open(os.path.join(os.path.dirname(__file__), str(os.getpid())), "a") as imports:
                imports.write(name + "\\n")
        return None

sys.meta_path.insert(0, _ModelLibraries())
"""


@pytest.fixture(scope="module")
def imports_seen(tmp_path_factory) -> Path:
    """A folder with IMPORT_WATCH as sitecustomize.py, and a file per process that imported a model library."""
    folder = tmp_path_factory.mktemp("imports-seen")
    (folder / "sitecustomize.py").write_text(IMPORT_WATCH)
    return folder


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, imports_seen):
    """One app for the tests below, in order; each leaves it serving, but the last, which kills it."""
    path = os.pathsep.join(filter(None, (str(imports_seen), os.environ.get("PYTHONPATH"))))
    running = start_demo_app(tmp_path_factory.mktemp("engine-app"), tiny_models, "--queue-size", "8",
                             own_process_group=True, engine_process=True, env={"PYTHONPATH": path})
    yield running
    stop_app(running)


def test_only_the_engine_process_imports_the_model_libraries(app, imports_seen):
    """The front serves pages and the line: diffusers and transformers would cost each start seconds, and memory."""
    importers = {int(path.name): set(path.read_text().split()) for path in imports_seen.iterdir()
                 if path.name.isdigit()}
    assert app.process.pid not in importers
    assert importers.get(_engine_of(app)) == {"diffusers", "transformers"}


def _restarts(app) -> float:
    return parse_samples(urllib.request.urlopen(f"{app.url}/metrics").read().decode())[
        ("zimage_engine_restarts_total", ())]


def test_an_edit_and_a_jpeg_pass_through_the_engine_process(app):
    """The picture and mask travel to the engine process with the request; the JPEG comes back from it."""
    picture, mask = io.BytesIO(), io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((64, 64)).save(picture, "PNG")
    transparent_left = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    transparent_left.paste((0, 0, 0, 0), (0, 0, 32, 64))
    transparent_left.save(mask, "PNG")
    body, content_type = multipart_body({"prompt": "a door", "steps": "1", "output_format": "jpeg"},
                                        [("image", "p.png", picture.getvalue()), ("mask", "m.png", mask.getvalue())])
    status, _, answer = raw_exchange(app, post_request("/v1/images/edits", body, content_type))
    assert status == 200, answer
    jpeg = base64.b64decode(json.loads(answer)["data"][0]["b64_json"])
    assert jpeg.startswith(b"\xff\xd8\xff") and Image.open(io.BytesIO(jpeg)).size == (64, 64)
    assert "mode=inpaint strength=1" in app.log()


def test_kill_9_of_the_engine_costs_the_running_request_only(app):
    health, watching = [], threading.Event()

    def watch_health():
        while not watching.is_set():
            health.append(http_status(f"{app.url}/healthz"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    killed, restarts, images = _engine_of(app), _restarts(app), set(app.output_dir.rglob("*.png"))
    with ThreadPoolExecutor(5) as clients:
        # 1024² and 8 steps of the tiny model: seconds on a CPU, time to kill it mid-run.
        running = clients.submit(_generate, app, "the running one", "1024x1024", 8)
        wait_until(lambda: _readyz(app)["busy"], 30, "the first request on the engine")
        waiting = [clients.submit(_generate, app, f"waiting {number}") for number in range(4)]
        wait_until(lambda: parse_samples(urllib.request.urlopen(f"{app.url}/metrics").read().decode())[
            ("zimage_queue_depth", ())] == 4, 30, "four waiting in line")
        os.kill(killed, signal.SIGKILL)
        status, answer = running.result(timeout=60)
        assert status == 503 and answer["error"]["code"] == "busy" and "Try again" in answer["error"]["message"]
        assert [future.result(timeout=120)[0] for future in waiting] == [200] * 4
    watching.set()
    watcher.join()
    assert set(health) == {200}, "/healthz answered throughout"
    log = app.log()
    assert re.search(rf"engine process exited number=\d+ pid={killed} signal=SIGKILL after it was ready "
                     rf"requests_lost=1", log)
    assert _engine_of(app) != killed and app.process.poll() is None
    assert _restarts(app) == restarts + 1
    # Nothing half-written: the output dir holds the four new images and nothing of the killed one.
    assert len(set(app.output_dir.rglob("*.png")) - images) == 4 and not list(app.output_dir.rglob("*/.*.tmp"))


def test_while_the_engine_restarts_readyz_and_the_status_say_so_and_requests_wait_for_it(app):
    """The standby is held stopped (SIGSTOP) when the engine process dies, so the restart lasts until the test lets
    it go on."""
    front = psutil.Process(app.process.pid)
    wait_until(lambda: len(_engine_processes(front)) == 2, 60, "the engine process and its standby")
    active = _engine_of(app)
    standby = next(process for process in _engine_processes(front) if process.pid != active)
    standby.suspend()
    os.kill(active, signal.SIGKILL)
    wait_until(lambda: "restarting" in _readyz(app), 30, "the restart shown")
    body = _readyz(app)
    assert re.fullmatch(r"about \d+ s", body["restarting"]) and body["ready"] is False
    assert http_status(f"{app.url}/healthz") == 200
    with ThreadPoolExecutor(1) as client:
        sent = client.submit(_generate, app, "sent during the restart")
        wait_until(lambda: _readyz(app)["busy"] is False and not sent.done(), 10, "the request waiting")
        standby.resume()
        assert sent.result(timeout=60)[0] == 200
    assert _readyz(app)["ready"] and "restarting" not in _readyz(app)


def test_a_frozen_engine_process_is_killed_and_replaced(tmp_path, tiny_models):
    """The "hang" fault stops the engine process (SIGSTOP) mid-request: no hang watch of its own can run, and no
    heartbeat comes; the front kills it once it has been silent for 10 s (or --hang-timeout, if longer)."""
    app = start_demo_app(tmp_path, tiny_models, "--hang-timeout", "5",
                         env={"ZIMAGE_TEST_MODE": "1", "ZIMAGE_FAULT": "hang@1/2"}, engine_process=True)
    try:
        assert _generate(app, "the first request runs")[0] == 200
        frozen = _engine_of(app)
        started = time.monotonic()
        status, answer = _generate(app, "the second one freezes its engine process")
        assert status == 503 and "engine process stopped" in answer["error"]["message"]
        assert 10 <= time.monotonic() - started < 40
        log = app.log()
        assert re.search(rf"engine process unresponsive number=1 pid={frozen} silent_s=1\d: killing it", log)
        assert f"engine process exited number=1 pid={frozen} signal=SIGKILL after it was ready requests_lost=1" in log
        wait_until(lambda: _readyz(app)["ready"], 60, "the next engine process ready")
        assert _generate(app, "the next engine's first request")[0] == 200
    finally:
        stop_app(app)


def test_sigusr2_replaces_the_engine_process_once_the_line_is_empty(app):
    """What the watchdog's GPU-memory watermark sends: the engine process is replaced (its GPU memory given back),
    but only once no job waits or runs; none is lost."""
    front = psutil.Process(app.process.pid)
    wait_until(lambda: len(_engine_processes(front)) == 2, 60, "the engine process and its standby")
    old, restarts, log_before = _engine_of(app), _restarts(app), len(app.log())
    with ThreadPoolExecutor(2) as clients:
        running = clients.submit(_generate, app, "running when the signal comes", "1024x1024", 8)
        wait_until(lambda: _readyz(app)["busy"], 30, "a request on the engine")
        waiting = clients.submit(_generate, app, "waiting when the signal comes")
        os.kill(app.process.pid, signal.SIGUSR2)
        assert running.result(timeout=120)[0] == 200 and waiting.result(timeout=120)[0] == 200
    wait_until(lambda: "engine process recycled number=" in app.log()[log_before:], 30,
               "the engine process replaced")
    wait_until(lambda: _readyz(app)["ready"], 60, "the next engine process ready")
    assert _engine_of(app) != old and _generate(app, "after the replacement")[0] == 200
    log = app.log()[log_before:]
    assert "engine process exited" not in log
    assert log.index("start='waiting when the signal comes'") < log.index("engine process recycling")
    assert _restarts(app) == restarts + 1


def test_kill_9_of_the_front_leaves_no_engine_process(app):
    """Last: it ends the module's app."""
    front = psutil.Process(app.process.pid)
    wait_until(lambda: len(_engine_processes(front)) == 2, 60, "the engine process and its standby")
    engines = _engine_processes(front)
    os.kill(app.process.pid, signal.SIGKILL)
    app.process.wait(timeout=10)
    _, alive = psutil.wait_procs(engines, timeout=10)
    assert alive == [], "an engine process outlived the front"
