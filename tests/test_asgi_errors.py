"""Failures of Gradio's own routes on input they did not expect, against a real `app.py --demo` process over raw
sockets: a JSON answer, and one log record each, not a bare 500 and a screenful of stderr."""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import urlsplit

import pytest

from config.log_lines import TRACEBACK_MARK
from tests.helpers import http_status, raw_exchange, start_demo_app, stop_app, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    app = start_demo_app(tmp_path_factory.mktemp("errors-app"), tiny_models)
    yield app
    stop_app(app)


def _post(app, path: str, body: dict) -> tuple[int, bytes]:
    payload = json.dumps(body).encode()
    status, _, answer = raw_exchange(app, f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
                                          f"Content-Type: application/json\r\nConnection: close\r\n"
                                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return status, answer


def test_an_unknown_api_name_is_a_404_naming_it(app):
    for route in ("call", "run", "api"):
        status, body = _post(app, f"/gradio_api/{route}/no_such_endpoint", {"data": []})
        assert status == 404, body
        assert "names no API endpoint" in json.loads(body)["error"]["message"]
    assert "unhandled error" not in app.log()


def test_a_failure_of_gradios_own_is_a_json_500_with_an_id_and_one_record(app):
    # Gradio's file route fails on a Range header of two dashes: a failure of Gradio's own, on a client's input.
    status, body = _post(app, "/v1/images/generations", {"prompt": "a kite", "size": "64x64", "steps": 1,
                                                         "response_format": "url"})
    assert status == 200, body
    path = urlsplit(json.loads(body)["data"][0]["url"]).path
    ids = []
    for _ in range(3):
        status, _, body = raw_exchange(app, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-1-2\r\n"
                                           f"Connection: close\r\n\r\n".encode())
        assert status == 500
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and error["id"] in error["message"]
        ids.append(error["id"])

    def logged() -> bool:
        return all(f"unhandled error id={incident} " in app.log() for incident in ids)

    wait_until(logged, 10, "each failure logged")
    lines = app.log().splitlines()
    records = [index for index, line in enumerate(lines) if "unhandled error id=" in line]
    assert len(records) == 3
    assert "method=GET path='/gradio_api/file=" in lines[records[0]] and "error=ValueError" in lines[records[0]]
    # The first carries its traceback, marked; the same failure again within the minute does not.
    assert lines[records[0] + 1] == TRACEBACK_MARK + "Traceback (most recent call last):"
    assert not lines[records[1] + 1].startswith(TRACEBACK_MARK)
    assert not any(" stderr " in line for line in lines)
    assert http_status(f"{app.url}/readyz") == 200


def test_uvicorns_own_complaints_are_one_record_of_its_logger(app):
    status, _, _ = raw_exchange(app, b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n")
    assert status == 400

    def logged() -> bool:
        return re.search(r"^\S+ WARNING uvicorn\.error Invalid HTTP request received\. \(0 more", app.log(),
                         re.M) is not None

    wait_until(logged, 10, "uvicorn's warning logged")
    assert "stderr" not in app.log()


def test_a_client_gone_mid_request_is_no_error(caplog):
    """Starlette raises ClientDisconnect where a client hung up (or was cut off for stalling) before its body was
    whole: nobody is left to answer, and nothing went wrong."""
    from starlette.requests import ClientDisconnect

    from webui.asgi_errors import AnswerUnhandledErrors

    async def app(_scope, _receive, _send):
        raise ClientDisconnect()

    sent = []

    async def send(message):
        sent.append(message)

    with caplog.at_level("INFO", logger="zimage.webui"):
        asyncio.run(AnswerUnhandledErrors(app)({"type": "http", "method": "POST", "path": "/v1/x"}, None, send))
    assert sent == [] and caplog.records == []
