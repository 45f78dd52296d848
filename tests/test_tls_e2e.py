"""HTTPS served by a real `app.py --demo` process with a self-signed certificate, and the refusal to take passwords
in clear text on a public bind."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from urllib.parse import urlsplit

import pytest

from tests.helpers import PROJECT_DIR, UNVERIFIED_TLS, http_status, start_demo_app, stop_app

pytestmark = pytest.mark.e2e


def make_self_signed(directory) -> tuple[str, str]:
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=zimage.test", "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True)
    return str(certificate), str(key)


@pytest.fixture(scope="module")
def tls_app(tmp_path_factory, tiny_models):
    directory = tmp_path_factory.mktemp("tls-app")
    certificate, key = make_self_signed(directory)
    app = start_demo_app(directory, tiny_models, "--ssl-certfile", certificate, "--ssl-keyfile", key,
                         "--auth", "alice:wonderland")
    yield app
    stop_app(app)


def test_the_service_speaks_https_and_says_so(tls_app):
    assert tls_app.url.startswith("https://")
    assert http_status(f"{tls_app.url}/readyz") == 200
    assert "ready url=https://127.0.0.1:" in tls_app.log()


def test_plain_http_gets_no_page_and_no_password_prompt(tls_app):
    address = urlsplit(tls_app.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic YWxpY2U6d29uZGVybGFuZA==\r\n\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1 200" not in answer and b"<html" not in answer.lower()


def test_the_openai_route_works_over_https(tls_app):
    request = urllib.request.Request(
        f"{tls_app.url}/v1/images/generations", method="POST",
        data=json.dumps({"prompt": "a fox", "size": "256x256", "steps": 2, "seed": 1}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer alice:wonderland"})
    with urllib.request.urlopen(request, timeout=120, context=UNVERIFIED_TLS) as response:
        body = json.loads(response.read())
    assert body["data"][0]["seed"] == 1 and body["data"][0]["b64_json"]


def test_passwords_on_a_public_bind_without_tls_stop_the_start(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--demo", "--host", "0.0.0.0", "--auth", "alice:pw"],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "refusing to take passwords in clear text on host 0.0.0.0" in result.stderr
    assert "loaded component" not in result.stdout + result.stderr
