"""The service under a real supervisord (the pip package), installed by scripts/install_service.py --standalone,
as the test user, in temporary directories, on loopback, with the tiny model. Tests run in file order and share
one supervisord."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from gradio_client import Client
from supervisor import childutils

from pipeline.layouts import LayoutKind
from tests.helpers import PROJECT_DIR, free_port, http_status

pytestmark = pytest.mark.e2e

PROGRAM = "z-image-turbo"
STARTSECS = 15  # as the installer gives the demo model: above its ~9-11 s from start to ready on two CPU cores
STOPWAITSECS = 12  # the service gets 2 s of it to finish a running job
LOG_MAXBYTES = 64 * 1024
LOG_BACKUPS = 2
BIN = Path(sys.executable).parent
# A restart that is not coming cannot be awaited, only given time: supervisord respawns an exited program on its next
# main-loop pass, and a pass waits at most 1 s for events.
NO_RESTART_WINDOW_S = 1.5


@dataclass
class Supervised:
    root: Path
    port: int
    demo_dir: Path

    @property
    def conf(self) -> Path:
        return self.root / "sv" / "supervisord.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def crash_dir(self) -> Path:
        return self.root / "crash"

    def rpc(self):
        return childutils.getRPCInterface({"SUPERVISOR_SERVER_URL": f"unix://{self.root / 'sv' / 'supervisor.sock'}"})

    def ctl(self, *command: str) -> str:
        result = subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *command], capture_output=True,
                                text=True, timeout=120)
        return result.stdout + result.stderr

    def info(self, program: str = PROGRAM) -> dict:
        return self.rpc().supervisor.getProcessInfo(program)

    def install(self, *env: str, name: str = PROGRAM, port: int | None = None, no_update: bool = False,
                app_args: tuple[str, ...] | None = None, engine_process: bool = False,
                stopwaitsecs: int = STOPWAITSECS) -> subprocess.CompletedProcess:
        """The program block for the demo model, or for `app_args`. `engine_process`: the engine in its own
        process, as the service runs by default; off, in the program's process, for the tests of what supervisord
        sees, the same either way: an engine process and its standby cost each start seconds of CI's two cores."""
        if app_args is None:
            app_args = ("--demo", "--demo-dir", str(self.demo_dir), "--log-prompts", "full",
                        *(() if engine_process else ("--no-engine-process",)))
        command = [
            sys.executable, "scripts/install_service.py", "--standalone", str(self.root / "sv"), "--name", name,
            "--port", str(port or self.port), "--python", sys.executable,
            "--log-file", str(self.log_dir / f"{name}.log"), "--log-maxbytes", str(LOG_MAXBYTES),
            "--log-backups", str(LOG_BACKUPS), "--crash-dir", str(self.crash_dir),
            "--output-dir", str(self.root / "outputs"), "--startsecs", str(STARTSECS),
            "--stopwaitsecs", str(stopwaitsecs), "--watchdog-failures", "2", "--startup-grace", "120",
            "--env", "ZIMAGE_TEST_MODE=1", *(arg for pair in env for arg in ("--env", pair)),
            *(["--no-update"] if no_update else []), "--", *app_args,
        ]
        result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def wait_ready(self, old_pid: int | None = None, timeout: float = 120) -> float:
        """Seconds until the program runs under a pid other than `old_pid` and /readyz answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            info = self.info()
            if info["statename"] in ("RUNNING", "STARTING") and info["pid"] not in (0, old_pid):
                try:
                    if http_status(f"{self.url}/readyz") == 200:
                        return time.monotonic() - started
                except OSError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s; state {self.info()}\n{self.program_log()[-3000:]}")

    def wait_state(self, state: str, program: str = PROGRAM, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(program)
            if info["statename"] == state:
                return info
            time.sleep(0.2)
        raise AssertionError(f"{program} never reached {state}: {self.info(program)}")

    def wait_for_watchdog_line(self, text: str, timeout: float = 30) -> None:
        watchdog_log = self.log_dir / f"{PROGRAM}-watchdog.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if watchdog_log.exists() and text in watchdog_log.read_text():
                return
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in the watchdog's log within {timeout} s")

    def program_log(self, name: str = PROGRAM) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def crash_report_of(self, pid: int, timeout: float = 20) -> Path:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reports = list(self.crash_dir.glob(f"crash-*-pid{pid}.txt"))
            if reports:
                return reports[0]
            time.sleep(0.2)
        raise AssertionError(f"no crash report for pid {pid} in {sorted(self.crash_dir.iterdir())}")

    def generate(self, prompt: str = "a supervised cat", **kwargs):
        client = Client(self.url, verbose=False)
        return client.predict(prompt, "256x256", 1, False, 2, 3.0, api_name="/generate", **kwargs)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("supervised")
    demo_dir = root / "demo-model"
    shutil.copytree(tiny_models[LayoutKind.SINGLE_FILE], demo_dir)
    service = Supervised(root=root, port=free_port(), demo_dir=demo_dir)
    service.install(engine_process=True)  # the service as it runs by default
    yield service
    service.ctl("shutdown")
    pid_file = root / "sv" / "supervisord.pid"
    deadline = time.monotonic() + 60
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_start_reaches_running_and_ready_within_startsecs(supervised):
    supervised.wait_ready()
    info = supervised.info()
    ready_after = time.time() - info["start"]
    assert ready_after < STARTSECS, f"ready only {ready_after:.1f} s after start"
    supervised.wait_state("RUNNING")
    assert supervised.ctl("status", PROGRAM).split()[:2] == [PROGRAM, "RUNNING"]
    log = supervised.program_log()
    assert "start version=" in log and "loaded component=transformer" in log and "ready url=" in log


def test_kill_9_is_restarted_and_reported(supervised, tmp_path):
    figures_path = tmp_path / "restart.json"
    result = subprocess.run(
        [sys.executable, "scripts/measure_restart.py", "--supervisor-conf", str(supervised.conf), "--url",
         supervised.url, "--trials", "1", "--json", str(figures_path)],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(figures_path.read_text())
    assert figures["max_s"] < 120
    report = supervised.crash_report_of(figures["killed_pids"][0]).read_text()
    assert "how it ended: terminated by SIGKILL" in report and "OOM killer" in report
    assert "--- last" in report and "ready url=" in report


def test_installer_writes_a_block_supervisord_accepts(supervised):
    supervised.install(name="zit-check", port=free_port(), no_update=True)
    assert "zit-check: available" in supervised.ctl("reread")
    (supervised.root / "sv" / "conf.d" / "zit-check.conf").unlink()
    assert "zit-check" not in supervised.ctl("reread")


def test_log_rotates_at_the_configured_size_keeping_the_configured_backups(supervised):
    supervised.wait_ready()
    # ~7 KB, under the 8 KiB the log keeps of one message: each request line is logged in full.
    long_prompt = "a very long and detailed prompt " * 220
    for number in range(24):
        supervised.generate(f"prompt number {number} {long_prompt}")
    log_files = sorted(path.name for path in supervised.log_dir.glob(f"{PROGRAM}.log*"))
    assert log_files == [f"{PROGRAM}.log", f"{PROGRAM}.log.1", f"{PROGRAM}.log.2"]
    # supervisor rolls over after the write that reaches maxbytes, so a file may pass it by one write.
    one_write = len(long_prompt) + 1000
    assert all((supervised.log_dir / name).stat().st_size <= LOG_MAXBYTES + one_write for name in log_files)
    assert (supervised.log_dir / f"{PROGRAM}.log.1").stat().st_size >= LOG_MAXBYTES


def test_stop_leaves_no_process_of_the_group(supervised):
    supervised.install("ZIMAGE_FAULT=spawn-child", engine_process=True)
    supervised.wait_ready()
    pid = supervised.info()["pid"]
    children = psutil.Process(pid).children(recursive=True)
    assert children, "the spawn-child fault should have left a child process"
    group = os.getpgid(pid)
    assert "stopped" in supervised.ctl("stop", PROGRAM)
    # The stopped service's killed child may take a moment to be reaped; one still there after this is a survivor.
    deadline = time.monotonic() + 10
    while (survivors := _members(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert survivors == []
    log = supervised.program_log()
    assert "ignored SIGTERM; killing it" in log and "shutdown done job=none exit=0" in log


def _members(group: int) -> list[int]:
    return [p.pid for p in psutil.process_iter() if _pgid(p.pid) == group]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_clean_exit_is_not_restarted(supervised):
    supervised.install()
    supervised.ctl("start", PROGRAM)
    supervised.wait_ready()
    pid = supervised.wait_state("RUNNING")["pid"]  # an exit within startsecs would count as a failed start
    os.kill(pid, signal.SIGTERM)  # from outside supervisor: the service exits 0 on its own
    info = supervised.wait_state("EXITED")
    assert info["exitstatus"] == 0
    time.sleep(NO_RESTART_WINDOW_S)
    assert supervised.info()["statename"] == "EXITED" and supervised.info()["pid"] == 0
    assert "EXITED" in supervised.ctl("status", PROGRAM)


def test_a_poisoned_gpu_restarts_the_engine_process_alone_with_a_snapshot(supervised):
    supervised.install("ZIMAGE_FAULT=poison@1", engine_process=True)
    supervised.wait_ready()
    pid = supervised.wait_state("RUNNING")["pid"]
    with pytest.raises(Exception, match="engine process stopped while making your image"):
        supervised.generate("this request poisons the GPU")
    supervised.wait_ready()
    assert supervised.info()["pid"] == pid  # the program went on; only its engine process started again
    log = supervised.program_log()
    assert re.search(r"engine process exited number=1 pid=(\d+) exit_code=1 error='CUDA error: an illegal memory "
                     r"access was encountered \(TEST FAULT poison\)' after it was ready requests_lost=1", log)
    engine_pid = int(re.search(r"engine process exited number=1 pid=(\d+)", log)[1])
    report = supervised.crash_report_of(engine_pid).read_text()
    assert "how it ended: exit status 1" in report and "its engine process" in report
    snapshot = Path(report.split("snapshot: ")[1].splitlines()[0])
    assert snapshot.name.startswith(f"snapshot-{engine_pid}-") and "this request poisons the GPU" in \
        snapshot.read_text()


def test_hang_is_detected_by_the_watchdog_and_restarted(supervised):
    """A frozen service (the engine in its own process: a frozen engine process is the service's to notice, see
    tests/test_engine_process.py)."""
    # A frozen process cannot drain: the stop's SIGTERM waits out stopwaitsecs before the SIGKILL, so a short one.
    supervised.install("ZIMAGE_FAULT=hang@1", stopwaitsecs=3)
    supervised.wait_ready()
    pid = supervised.wait_state("RUNNING")["pid"]
    # Hung before the watchdog has seen it healthy, the process would get the start-up grace (120 s) first.
    supervised.wait_for_watchdog_line(f"pid={pid} healthz=ok watching")
    threading.Thread(target=lambda: _ignore_errors(supervised.generate), daemon=True).start()
    deadline = time.monotonic() + 30
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.2)
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
    supervised.wait_ready(old_pid=pid, timeout=150)
    watchdog_log = (supervised.log_dir / f"{PROGRAM}-watchdog.log").read_text()
    assert f"pid={pid} restarting reason='/healthz failed 2 times in a row'" in watchdog_log


def _ignore_errors(call):
    try:
        call()
    except Exception:
        pass


def test_bad_model_dir_ends_fatal_with_the_reason_in_the_log(supervised):
    supervised.install(name="zit-bad", port=free_port(),
                       app_args=("--model-dir", str(supervised.root / "no-weights-here")))
    supervised.wait_state("FATAL", program="zit-bad", timeout=180)
    assert "FATAL" in supervised.ctl("status", "zit-bad")
    log = supervised.program_log("zit-bad")
    assert log.count("cannot start: model directory") == 4  # the first try and startretries=3 more
    assert "--demo" in log
