"""Wrong credentials on a real `app.py --demo --auth` process: refused, logged, and past a few dozen a minute from
one address not even checked."""

from __future__ import annotations

import asyncio
import base64
import urllib.error
import urllib.request

import pytest

from tests.helpers import http_status, raw_exchange, start_demo_app, stop_app, wait_until
from webui import auth
from webui.auth import FAILURE_WINDOW_S, FAILURES_ALLOWED, LINK_LIFETIME_S, LinkSigner, RequireCredentials

USER, PASSWORD = "alice", "wonderland"


def _status(url: str, password: str | None) -> tuple[int, dict[str, str]]:
    headers = {} if password is None else {
        "Authorization": "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


@pytest.mark.e2e
def test_an_address_guessing_passwords_is_stopped_and_logged(tmp_path, tiny_models):
    app = start_demo_app(tmp_path, tiny_models, "--auth", f"{USER}:{PASSWORD}")
    try:
        assert _status(f"{app.url}/v1/models", PASSWORD)[0] == 200
        assert [_status(f"{app.url}/v1/models", f"guess{n}")[0] for n in range(FAILURES_ALLOWED)] == \
            [401] * FAILURES_ALLOWED
        # From now on this address's credentials are not checked, the right ones neither: no more guesses.
        status, headers = _status(f"{app.url}/v1/models", PASSWORD)
        assert status == 429 and 0 < int(headers["retry-after"]) <= FAILURE_WINDOW_S
        assert _status(f"{app.url}/v1/models", None)[0] == 401  # no credentials: asked for them, as before
        assert http_status(f"{app.url}/readyz") == 200

        def logged() -> bool:
            return "wrong credentials refused user='alice' client='loopback' path='/v1/models'" in app.log() and \
                "credentials from 'loopback' not checked" in app.log()

        wait_until(logged, 10, "the refusals logged")
        # One line an interval for a burst, with the count, not one per guess.
        assert app.log().count("wrong credentials refused") == 1
    finally:
        stop_app(app)


def test_the_address_may_try_again_once_the_window_has_moved_on(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    passed = []

    async def app(scope, _receive, _send):
        passed.append(scope["path"])

    guard = RequireCredentials(app, {USER: PASSWORD})
    answers = []

    async def send(message):
        if message["type"] == "http.response.start":
            answers.append(message["status"])

    def request(password: str) -> None:
        token = base64.b64encode(f"{USER}:{password}".encode())
        scope = {"type": "http", "path": "/v1/models", "client": ("10.0.0.9", 5555),
                 "headers": [(b"authorization", b"Basic " + token)]}
        asyncio.run(guard(scope, None, send))

    for _ in range(FAILURES_ALLOWED):
        request("guess")
    request(PASSWORD)
    assert answers == [401] * FAILURES_ALLOWED + [429] and passed == []
    now[0] += FAILURE_WINDOW_S
    request(PASSWORD)
    assert passed == ["/v1/models"]


def test_a_signed_link_opens_its_path_until_it_expires(monkeypatch):
    now = [1_800_000_000.0]
    monkeypatch.setattr(auth, "time", type("Clock", (), {"time": staticmethod(lambda: now[0])}))
    links = LinkSigner()
    path = "/v1/images/files/2026-12-04/a b#x.png"
    query = links.query(path).encode()
    assert links.opens(path, query) and not links.opens(path + "x", query)
    assert not LinkSigner().opens(path, query)  # another start's key
    now[0] += LINK_LIFETIME_S + 1
    assert not links.opens(path, query)


def test_every_loopback_address_is_one_address_to_the_count():
    """A local user can send from any address of 127.0.0.0/8: that is no way around the count."""
    guard = RequireCredentials(lambda *_: None, {USER: PASSWORD})
    answers = []

    async def send(message):
        if message["type"] == "http.response.start":
            answers.append(message["status"])

    for number in range(FAILURES_ALLOWED + 1):
        token = base64.b64encode(f"{USER}:guess".encode())
        scope = {"type": "http", "path": "/v1/models", "client": (f"127.0.{number}.1", 5555),
                 "headers": [(b"authorization", b"Basic " + token)]}
        asyncio.run(guard(scope, None, send))
    assert answers == [401] * FAILURES_ALLOWED + [429]


def _raw_status(app, path: str, *headers: bytes) -> int:
    return raw_exchange(app, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                        + b"".join(header + b"\r\n" for header in headers) + b"\r\n")[0]


def _basic(user: str, password: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.e2e
def test_forwarded_addresses_count_only_from_a_trusted_proxy(tmp_path, tiny_models):
    """Before, uvicorn believed X-Forwarded-For from loopback: a new address in each guess was never locked out,
    and the header's text reached the log as fields of its own."""
    direct = start_demo_app(tmp_path / "direct", tiny_models, "--auth", f"{USER}:{PASSWORD}")
    try:
        guesses = [_raw_status(direct, "/v1/models", _basic(USER, f"guess{n}"),
                               b"X-Forwarded-For: 203.0.113.%d" % n) for n in range(FAILURES_ALLOWED)]
        assert guesses == [401] * FAILURES_ALLOWED
        assert _raw_status(direct, "/v1/models", _basic(USER, PASSWORD), b"X-Forwarded-For: 198.51.100.1") == 429
        wait_until(lambda: "client='loopback'" in direct.log(), 10, "the refusals logged")
        assert "203.0.113." not in direct.log()
    finally:
        stop_app(direct)
    proxied = start_demo_app(tmp_path / "proxied", tiny_models, "--auth", f"{USER}:{PASSWORD}",
                             "--trusted-proxy", "127.0.0.1")
    try:
        forged = b"X-Forwarded-For: 1.2.3.4 user=root"
        guesses = [_raw_status(proxied, "/v1/models", _basic(USER, "guess"), forged) for _ in range(FAILURES_ALLOWED)]
        assert guesses == [401] * FAILURES_ALLOWED
        assert _raw_status(proxied, "/v1/models", _basic(USER, PASSWORD), forged) == 429
        # Another client behind the same proxy is its own address.
        assert _raw_status(proxied, "/v1/models", _basic(USER, PASSWORD), b"X-Forwarded-For: 198.51.100.1") == 200
        wait_until(lambda: "wrong credentials refused" in proxied.log(), 10, "the refusals logged")
        assert "client='1.2.3.4 user=root'" in proxied.log()  # quoted: the proxy passed on what the client sent
    finally:
        stop_app(proxied)


UNREADABLE = ["Basic " + "é" * 8, "Basic !!!!", "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Bearer no-colon",
              "Digest user=alice"]  # not ASCII, not base64, not UTF-8, no colon, another scheme


@pytest.mark.e2e
def test_unreadable_credentials_are_wrong_ones_counted(tmp_path, tiny_models):
    """Before, a Basic token outside ASCII was a 500 and an ERROR line each time, and never counted."""
    app = start_demo_app(tmp_path, tiny_models, "--auth", f"{USER}:{PASSWORD}")
    try:
        headers = [b"Authorization: " + UNREADABLE[n % len(UNREADABLE)].encode("latin-1")
                   for n in range(FAILURES_ALLOWED)]
        assert [_raw_status(app, "/v1/models", header) for header in headers] == [401] * FAILURES_ALLOWED
        assert _raw_status(app, "/v1/models", _basic(USER, PASSWORD)) == 429
        assert "unhandled error" not in app.log() and " ERROR " not in app.log()
    finally:
        stop_app(app)
