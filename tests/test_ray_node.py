"""deploy/supervisor/ray-node.conf: supervisor reads both blocks with the service's rules, every `ray start` option
they use exists in the installed Ray, and a front started with --ray-address joins the head its block starts."""

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from supervisor.datatypes import RestartUnconditionally, RestartWhenExitUnexpected
from supervisor.options import ServerOptions, UnhosedConfigParser

from tests.helpers import PROJECT_DIR, free_port, generate_over_http, http_status, start_demo_app, wait_until

TEMPLATE = PROJECT_DIR / "deploy" / "supervisor" / "ray-node.conf"
RAY = Path(sys.executable).parent / "ray"


def _programs(tmp_path, head_ip="10.0.0.1"):
    text = TEMPLATE.read_text().format(ray=RAY, head_ip=head_ip, log_dir=tmp_path)
    parser = UnhosedConfigParser()
    parser.read_string(text)
    options = ServerOptions()
    return {section.split(":", 1)[1]: options.processes_from_section(parser, section, section.split(":", 1)[1])[0]
            for section in parser.sections()}


def test_both_blocks_are_supervisor_programs_that_keep_their_process_group_and_log(tmp_path):
    programs = _programs(tmp_path)
    assert set(programs) == {"ray-head", "ray-worker"}
    head, worker = programs["ray-head"], programs["ray-worker"]
    assert head.autorestart is RestartWhenExitUnexpected
    assert worker.autorestart is RestartUnconditionally  # its head gone, it exits: start it again
    for program in (head, worker):
        assert program.stopasgroup and program.killasgroup
        assert "--block" in program.command.split()  # in the foreground: supervisor sees it end
        assert Path(program.stdout_logfile).parent == tmp_path
    assert "--address=10.0.0.1:6379" in worker.command and "--port=6379" in head.command


def test_every_ray_start_option_the_blocks_use_exists():
    pytest.importorskip("ray")
    help_text = subprocess.run([str(RAY), "start", "--help"], capture_output=True, text=True, timeout=120).stdout
    used = set(re.findall(r"(--[a-z-]+)", " ".join(
        line for line in TEMPLATE.read_text().splitlines() if line.startswith("command="))))
    assert used and all(re.search(rf"^\s+{option}\b", help_text, re.M) for option in used), used


HEAD_START_TIMEOUT_S = 120
REPLACE_TIMEOUT_S = 90


def _serve_replicas(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for process in root.children(recursive=True):
        try:
            if "ServeReplica" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.e2e
def test_a_front_joins_the_head_its_block_starts_and_leaves_it_running_without_replicas(tmp_path, tiny_models):
    """The ray-head block's own command (on loopback, a free port, a short temp dir: Ray's socket paths must fit
    107 bytes) under its block's environment; a front with another token is refused, naming it; app.py --replicas 1
    --ray-address with the cluster's token joins it and serves; its one replica killed, /readyz is 503 until Serve
    has replaced it; on SIGTERM the front takes its replica away while the head, supervisor's program, runs on."""
    pytest.importorskip("ray")
    head_block = _programs(tmp_path, head_ip="127.0.0.1")["ray-head"]
    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="zr-"))
    command = head_block.command.replace("--port=6379", f"--port={port}")
    head_log = tmp_path / "ray-head.log"
    # The cluster's token, as `ray get-auth-token --generate` makes one, in a file of the test's own.
    token, wrong_token = tmp_path / "auth_token", tmp_path / "wrong_token"
    token.write_text(secrets.token_hex(32))
    wrong_token.write_text(secrets.token_hex(32))
    with head_log.open("w") as log:
        head = subprocess.Popen([*shlex.split(command), f"--temp-dir={temp_dir}"], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,  # one group, as stopasgroup needs
                                env={**os.environ, **head_block.environment, "RAY_AUTH_TOKEN_PATH": str(token)})
    try:
        wait_until(lambda: head.poll() is not None or "Ray runtime started" in head_log.read_text(),
                   HEAD_START_TIMEOUT_S, "the head's start")
        assert head.poll() is None, head_log.read_text()
        address = ["--replicas", "1", "--ray-address", f"127.0.0.1:{port}", "--compile-delay", "0"]
        # Ray tries to connect about once a second, 20 times by default, whatever the error; the head is up, so
        # two tries tell the refusal as well (RAY_gcs_server_port_wait_time_s: the operator's budget for them).
        with pytest.raises(AssertionError, match=rf"app exited with 1:(.|\n)*cannot start: cannot join the Ray "
                                                 rf"cluster at 127\.0\.0\.1:{port}: .*this host's Ray token"):
            start_demo_app(tmp_path / "stranger", tiny_models, *address,
                           env={"RAY_AUTH_TOKEN_PATH": str(wrong_token), "RAY_gcs_server_port_wait_time_s": "2"})
        app = start_demo_app(tmp_path, tiny_models, *address, env={"RAY_AUTH_TOKEN_PATH": str(token)})
        assert generate_over_http(app.url, "a joined cluster")["data"][0]["b64_json"]
        assert f"ray_address=127.0.0.1:{port}" in app.log()
        [replica] = _serve_replicas(psutil.Process(head.pid))  # on the head's node
        # Its only replica killed: not ready until Serve has replaced it, then serving again.
        replica.kill()
        wait_until(lambda: http_status(f"{app.url}/readyz") == 503, 30, "/readyz 503 with no replica ready")
        wait_until(lambda: http_status(f"{app.url}/readyz") == 200, REPLACE_TIMEOUT_S, "the replica replaced")
        assert generate_over_http(app.url, "a joined cluster again")["data"][0]["b64_json"]
        app.process.terminate()
        assert app.process.wait(timeout=60) == 0, app.log()[-3000:]
        assert head.poll() is None, head_log.read_text()
        wait_until(lambda: not _serve_replicas(psutil.Process(head.pid)), 30, "the replica gone from the head")
    finally:
        # SIGTERM to `ray start` alone: it drains the node and ends its processes. Sent to the whole group, the
        # GCS would end with it, and `ray start` would wait 30 s for it to answer the drain.
        head.terminate()
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # none left: the usual end
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
