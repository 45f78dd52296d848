"""Cross-site requests: a page on another site cannot make images, our own pages and non-browser clients can."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.helpers import start_demo_app, stop_app
from webui.origin import foreign_origin

EVIL = "http://evil.example"
FORGED_JSON = json.dumps({"data": ["a cat"]}).encode()  # what a form or a fetch() with text/plain can post


@pytest.mark.parametrize(("method", "headers", "refused"), [
    ("POST", {b"host": b"127.0.0.1:7860", b"origin": b"http://127.0.0.1:7860"}, False),
    # An SSH tunnel from another local port: the browser addresses, and names, the tunnel's end.
    ("POST", {b"host": b"localhost:8000", b"origin": b"http://localhost:8000"}, False),
    ("POST", {b"host": b"gpu.example.com", b"origin": b"https://GPU.example.com"}, False),
    ("POST", {b"host": b"127.0.0.1:7860"}, False),
    ("POST", {b"host": b"127.0.0.1:7860", b"origin": EVIL.encode()}, True),
    ("DELETE", {b"host": b"127.0.0.1:7860", b"origin": EVIL.encode()}, True),
    ("POST", {b"host": b"127.0.0.1:7860", b"origin": b"http://127.0.0.1:7861"}, True),
    ("POST", {b"host": b"127.0.0.1:7860", b"origin": b"null"}, True),  # sandboxed frames, file:// pages
    ("POST", {b"origin": b"http://127.0.0.1:7860"}, True),  # no Host: nothing to be the same as
    ("POST", {b"host": b"127.0.0.1:7860", b"referer": b"http://127.0.0.1:7860/?x=1"}, False),
    ("POST", {b"host": b"127.0.0.1:7860", b"referer": EVIL.encode() + b"/page"}, True),
    ("GET", {b"host": b"127.0.0.1:7860", b"origin": EVIL.encode()}, False),  # reads change nothing
])
def test_foreign_origin_decides_by_origin_then_referer_against_host(method, headers, refused):
    assert (foreign_origin(method, headers) is not None) is refused


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    running = start_demo_app(tmp_path_factory.mktemp("origin-app"), tiny_models)
    yield running
    stop_app(running)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def saved_pngs(app) -> set:
    return set(app.output_dir.rglob("*.png"))


@pytest.mark.e2e
def test_another_sites_page_is_refused_and_makes_no_image(app):
    before = saved_pngs(app)
    openai_body = json.dumps({"prompt": "a cat", "size": "256x256", "steps": 1}).encode()
    status, body = post(f"{app.url}/v1/images/generations", openai_body,
                        {"Content-Type": "text/plain", "Origin": EVIL})
    assert status == 403
    assert body["error"]["code"] == "forbidden_origin" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    for content_type, data in (("text/plain", FORGED_JSON), ("application/x-www-form-urlencoded", b"data=a+cat")):
        status, body = post(f"{app.url}/gradio_api/call/generate", data, {"Content-Type": content_type,
                                                                          "Origin": EVIL})
        assert status == 403 and "Cross-site request refused" in body["error"]
    # An older browser that sends only a Referer is held to the same rule.
    status, _ = post(f"{app.url}/v1/images/generations", openai_body, {"Referer": f"{EVIL}/page.html"})
    assert status == 403
    assert saved_pngs(app) == before
    assert "cross-site request refused method=POST path=/v1/images/generations origin='http://evil.example'" \
        in app.log()


@pytest.mark.e2e
@pytest.mark.parametrize("origin", [None, "own"], ids=["no-origin", "same-origin"])
def test_own_pages_and_clients_without_origin_are_served(app, origin):
    headers = {"Content-Type": "application/json"} | ({"Origin": app.url} if origin else {})
    before = saved_pngs(app)
    openai_body = json.dumps({"prompt": "a cat", "size": "256x256", "steps": 1}).encode()
    status, body = post(f"{app.url}/v1/images/generations", openai_body, headers)
    assert status == 200 and len(body["data"]) == 1
    assert len(saved_pngs(app) - before) == 1
    status, body = post(f"{app.url}/gradio_api/call/generate", FORGED_JSON, headers)
    assert status == 200 and "event_id" in body  # the call reached Gradio's queue
