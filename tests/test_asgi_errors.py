"""Failures of Gradio's own routes on input they did not expect, against a real `app.py --demo` process over raw
sockets: a JSON answer, and one log record each, not a bare 500 and a screenful of stderr."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.helpers import post_json, raw_exchange, start_demo_app, stop_app, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    app = start_demo_app(tmp_path_factory.mktemp("errors-app"), tiny_models)
    yield app
    stop_app(app)


def test_an_unknown_api_name_is_a_404_naming_it(app):
    for route in ("call", "call/v2", "run", "api"):
        status, body = post_json(app, f"/gradio_api/{route}/no_such_endpoint", {"data": []})
        assert status == 404, body
        assert "names no API endpoint" in json.loads(body)["error"]["message"]
    assert "unhandled error" not in app.log()


def test_answers_broken_off_are_one_line_an_interval(app):
    """Gradio's result stream starts its answer, then fails, for a session it does not know: any client can ask
    for one in a loop. The client has no incident id to quote, so each one is no ERROR line of its own."""
    for number in range(5):
        raw_exchange(app, f"GET /gradio_api/queue/data?session_hash=gone-{number} HTTP/1.1\r\nHost: localhost\r\n"
                          f"Connection: close\r\n\r\n".encode())
    wait_until(lambda: "answer broken off method=GET path='/gradio_api/queue/data'" in app.log(), 10, "logged")
    log = app.log()
    assert log.count("answer broken off") == 1 and log.count("ASGI callable returned without completing") == 1
    assert "unhandled error" not in log


def test_an_authorization_header_of_any_bytes_is_no_error_without_auth(app):
    """Without --auth the route sends no credentials on into the queue, so bytes outside ASCII (which its HTTP
    client refuses to send) are no failure."""
    payload = json.dumps({"prompt": "a kite", "size": "64x64", "steps": 1}).encode()
    status, _, answer = raw_exchange(app, b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\n"
                                          b"Authorization: Bearer caf\xe9\r\nContent-Type: application/json\r\n"
                                          b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload)
                                          + payload)
    assert status == 200, answer
    assert "unhandled error" not in app.log()


def test_an_exception_escaping_the_app_is_a_json_500_with_an_id_and_one_record(caplog):
    """Any failure of a route the service does not own (Gradio's, on input it did not expect), here raised by an
    app of the test's own: with the real service's Gradio no input is known to fail any more."""
    from webui.asgi_errors import AnswerUnhandledErrors

    async def failing(_scope, _receive, _send):
        raise ValueError("a route failed on input it did not expect")

    middleware = AnswerUnhandledErrors(failing)
    answers = []
    with caplog.at_level("INFO", logger="zimage.webui"):
        for _ in range(3):
            sent = []

            async def send(message, sent=sent):
                sent.append(message)

            asyncio.run(middleware({"type": "http", "method": "GET", "path": "/gradio_api/file=/x\n"}, None, send))
            answers.append(sent)
    ids = []
    for start, body in answers:
        assert start["status"] == 500 and (b"content-type", b"application/json") in start["headers"]
        error = json.loads(body["body"])["error"]
        assert error["type"] == "server_error" and error["id"] in error["message"]
        ids.append(error["id"])
    assert len(set(ids)) == 3
    assert [record.levelname for record in caplog.records] == ["ERROR"] * 3
    for record, incident in zip(caplog.records, ids):
        message = record.getMessage()
        assert f"unhandled error id={incident} method=GET path='/gradio_api/file=/x\\n'" in message
        assert "error=ValueError: 'a route failed" in message
    # The first carries its traceback; the same failure again within the minute does not.
    assert caplog.records[0].exc_info is not None
    assert caplog.records[1].exc_info is None and caplog.records[2].exc_info is None


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
