"""Range requests for an image, against a real `app.py --demo` process over raw sockets (the Range and Cookie
headers go out exactly as written)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from tests.helpers import http_status, raw_exchange, start_demo_app, stop_app

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    app = start_demo_app(tmp_path_factory.mktemp("ranges-app"), tiny_models)
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def image(app) -> tuple[str, bytes]:
    """An image's path on the server and its whole bytes."""
    body = json.dumps({"prompt": "a kite", "size": "64x64", "steps": 1, "response_format": "url"}).encode()
    status, _, answer = raw_exchange(app, b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\n"
                                          b"Content-Type: application/json\r\nConnection: close\r\n"
                                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status == 200, answer
    path = urlsplit(json.loads(answer)["data"][0]["url"]).path
    status, _, whole = _get(app, path)
    assert status == 200
    return path, whole


def _get(app, path: str, *fields: str) -> tuple[int, dict[str, str], bytes]:
    head = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close", *fields]
    return raw_exchange(app, ("\r\n".join(head) + "\r\n\r\n").encode())


def test_a_range_gets_those_bytes_and_no_request_header_comes_back(app, image):
    path, whole = image
    status, headers, body = _get(app, path, "Range: bytes=0-3", "Cookie: session=secret-value")
    assert status == 206 and body == whole[:4]
    assert headers["content-range"] == f"bytes 0-3/{len(whole)}"
    assert "cookie" not in headers and "secret-value" not in str(headers)  # Gradio's own answer echoed it


def test_a_suffix_and_several_ranges_are_served(app, image):
    path, whole = image
    status, _, body = _get(app, path, "Range: bytes=-5")
    assert status == 206 and body == whole[-5:]
    status, headers, body = _get(app, path, "Range: bytes=0-1,3-4")
    assert status == 206 and headers["content-type"].startswith("multipart/byteranges")  # Gradio's own: a 500
    assert whole[:2] in body and whole[3:5] in body


@pytest.mark.parametrize("value, status", [("bytes=0-1-2", 400), ("bytes=5-2", 400), ("items=0-3", 400),
                                           ("bytes=99999999-", 416)])
def test_a_range_that_cannot_be_served_is_a_clear_refusal(app, image, value, status):
    path, _ = image
    answered, _, _ = _get(app, path, f"Range: {value}")
    assert answered == status  # Gradio's own: 500, or one byte for the backwards range
    assert "unhandled error" not in app.log()
    assert http_status(f"{app.url}/readyz") == 200
