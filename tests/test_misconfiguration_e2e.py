"""A careless operator's mistakes, met by a real `app.py --demo` process: each is named at once, before any GPU time."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from gradio_client import Client

from tests.helpers import PROJECT_DIR, free_port, start_demo_app, stop_app

pytestmark = pytest.mark.e2e


def run_app(*flags: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "app.py", *flags], cwd=PROJECT_DIR, capture_output=True, text=True,
                            timeout=120)
    return result, time.monotonic() - started


def readiness(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_port_in_use_exits_2_at_once_before_loading_anything(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result, seconds = run_app("--demo", "--demo-dir", str(tmp_path / "demo-model"), "--port", str(port),
                                  "--output-dir", str(tmp_path / "outputs"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"app.py: error: port {port} on 127.0.0.1 is in use" in result.stderr
    assert "loaded component" not in result.stdout + result.stderr and not (tmp_path / "demo-model").exists()
    assert seconds < 20


def test_an_output_dir_that_cannot_be_written_stops_the_start_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the directory should be: no writing there, not even as root
    result, _ = run_app("--demo", "--demo-dir", str(tmp_path / "demo-model"), "--port", str(free_port()),
                        "--output-dir", str(blocker / "outputs"))
    assert result.returncode == 1
    assert f"cannot start: output_dir {blocker / 'outputs'} is not a writable directory: Not a directory" in \
        result.stdout
    assert "loaded component" not in result.stdout and not (tmp_path / "demo-model").exists()


def test_passwords_other_users_can_read_are_warned_about_once_each(tmp_path):
    users = tmp_path / "users"
    users.write_text("alice:s3cret\n")
    users.chmod(0o644)
    # The warnings come before the model loads; an output dir that cannot exist ends the run right after them.
    result, _ = run_app("--auth", "carol:pw", "--auth-file", str(users), "--port", str(free_port()),
                        "--output-dir", str(users / "outputs"))
    warnings = [line for line in result.stdout.splitlines() if " WARNING " in line and "INSECURE" in line]
    assert len(warnings) == 2, result.stdout
    assert "--auth password is visible to every user" in warnings[0] and "--auth-file FILE with mode 600" in warnings[0]
    assert f"auth_file {users} is readable by every user of this machine (mode 644)" in warnings[1]


def test_an_output_dir_broken_while_serving_refuses_requests_until_it_is_fixed(tmp_path, tiny_models):
    app = start_demo_app(tmp_path, tiny_models, engine_process=True)
    client = Client(app.url, verbose=False)
    moved = tmp_path / "outputs-moved"
    try:
        app.output_dir.rename(moved)
        app.output_dir.write_text("")  # the directory is now a file: nothing can be saved there
        for _ in range(3):
            status, body = readiness(app.url)
            assert status == 503
            assert body["output_dir_error"] == f"output_dir {app.output_dir} is not a directory"
        with pytest.raises(Exception, match="cannot save images right now"):
            client.predict("never drawn", "256x256", 1, False, 2, 3.0, api_name="/generate")
        log = app.log()
        assert log.count("output dir unusable") == 1  # one line, however often it was probed
        assert "outcome=refused reason=output-dir-unusable" in log and "outcome=ok" not in log

        app.output_dir.unlink()
        moved.rename(app.output_dir)
        status, body = readiness(app.url)
        assert status == 200 and "output_dir_error" not in body
        _, seed, _, png = client.predict("drawn", "256x256", 2, False, 2, 3.0, api_name="/generate")
        assert seed == 2 and list(app.output_dir.rglob("*.png"))
        assert "output dir usable again" in app.log()
    finally:
        stop_app(app)
