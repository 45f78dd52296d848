"""The body limit, Gradio's routes' guards and the file route's ranges on a real `app.py --demo` process, attacked
over raw sockets (an HTTP client library would buffer, retry or refuse to send what a hostile client sends; the
Range and Cookie headers go out exactly as written), and the helper that cuts echoed values."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import select
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import psutil
import pytest
from gradio_client import Client
from PIL import Image

from pipeline.requests import MAX_PROMPT_CHARS
from tests.helpers import (
    PROJECT_DIR,
    connect,
    fn_index_of,
    get_request,
    page_events,
    http_status,
    raw_exchange,
    read_response,
    read_until_closed,
    start_demo_app,
    stop_app,
    wait_until,
)
from webui.limits import MAX_BODY_BYTES, NEW_SESSION_BURST, UPLOADS_AT_ONCE

CHUNK = 64 * 1024
RSS_GROWTH_LIMIT = 100 * 2**20  # before the limit, 8 bodies of 50 MB at once took the process from ~1 GB to 3.1 GB


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    app = start_demo_app(tmp_path_factory.mktemp("limits-app"), tiny_models)
    yield app
    stop_app(app)


def _head(path: str, *fields: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json", "Connection: close",
             *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunked(data: bytes, chunk: int = CHUNK):
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def _push(sock: socket.socket, pieces) -> int:
    """Send `pieces` until the server answers or hangs up, as a client that ignores the answer would; the number of
    bytes sent."""
    sent = 0
    for piece in pieces:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    return sent


def _assert_refused_as_too_large(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 413
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/gradio_api/call/images", "/v1/images/generations"])
def test_a_declared_oversized_body_is_refused_before_a_byte_of_it_is_sent(app, path):
    with connect(app) as sock:
        sock.sendall(_head(path, f"Content-Length: {50 * 2**20}"))
        _assert_refused_as_too_large(*read_response(sock))


@pytest.mark.e2e
def test_a_chunked_body_is_refused_the_moment_it_passes_the_limit(app):
    # One byte past the limit and no end of body: the answer comes while the body is still open. (Sending no more
    # than the server reads keeps the test deterministic: bytes left unread when it hangs up would make its kernel
    # answer with a reset, which may drop the 413 before the client reads it.)
    with connect(app) as sock:
        sock.sendall(_head("/gradio_api/call/images", "Transfer-Encoding: chunked"))
        for piece in list(_chunked(b"x" * (MAX_BODY_BYTES + 1)))[:-1]:
            sock.sendall(piece)
        _assert_refused_as_too_large(*read_response(sock))


@pytest.mark.e2e
def test_a_chunked_body_under_the_limit_goes_through(app):
    request = json.dumps({"prompt": "a chunked lighthouse", "size": "64x64", "steps": 1}).encode()
    with connect(app) as sock:
        sock.sendall(_head("/v1/images/generations", "Transfer-Encoding: chunked"))
        _push(sock, _chunked(request, chunk=7))
        status, _, body = read_response(sock)
    assert status == 200 and len(json.loads(body)["data"]) == 1


@pytest.mark.e2e
def test_many_large_bodies_at_once_leave_memory_flat_and_the_server_serving(app):
    """Issue 11's attacks, at once: bodies of 50 MB with their length declared, and chunked ones of 20 MB."""
    process = psutil.Process(app.process.pid)
    before = peak = process.memory_info().rss
    attacking = True

    def sample() -> None:
        nonlocal peak
        while attacking:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    def refused(sock: socket.socket) -> None:
        try:
            _assert_refused_as_too_large(*read_response(sock))
        except ConnectionResetError:
            pass  # the server hung up on bytes it will not read; its 413 may be lost to the reset, as with any server

    def declared(path: str) -> None:
        size = 50 * 2**20
        with connect(app) as sock:
            sock.sendall(_head(path, f"Content-Length: {size}"))
            _push(sock, (b"x" * 2**20 for _ in range(size // 2**20)))
            refused(sock)

    def chunked(path: str) -> None:
        with connect(app) as sock:
            sock.sendall(_head(path, "Transfer-Encoding: chunked"))
            _push(sock, _chunked(b"x" * 20 * 2**20))
            refused(sock)

    sampler = threading.Thread(target=sample)
    sampler.start()
    failures = []

    def run(attack, path) -> None:
        try:
            attack(path)
        except Exception as error:  # noqa: BLE001 - reported below, in the test's own thread
            failures.append(error)

    attackers = [threading.Thread(target=run, args=(attack, path))
                 for attack in (declared, chunked) for path in ("/gradio_api/call/images", "/v1/images/generations")
                 for _ in range(4)]
    for attacker in attackers:
        attacker.start()
    for attacker in attackers:
        attacker.join(timeout=60)
    attacking = False
    sampler.join()
    assert not failures
    assert peak - before < RSS_GROWTH_LIMIT, f"RSS grew by {(peak - before) / 2**20:.0f} MiB"
    assert http_status(f"{app.url}/readyz") == 200


@pytest.mark.e2e
def test_the_longest_prompt_the_ui_can_send_is_far_under_the_limit(app):
    # Three bytes a character in UTF-8, six when escaped: still a small part of the limit.
    prompt = "猫" * MAX_PROMPT_CHARS
    assert len(json.dumps(prompt)) < MAX_BODY_BYTES // 4
    client = Client(app.url, verbose=False)
    _, seed_used, _, _ = client.predict(prompt, "64x64", 3, False, 1, 3.0, api_name="/generate")
    assert seed_used == 3


def _upload(app, filename: str, content: bytes) -> tuple[int, bytes]:
    boundary = "zimage-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    status, _, answer = raw_exchange(app, f"POST /gradio_api/upload HTTP/1.1\r\nHost: localhost\r\n"
                                          f"Connection: close\r\nContent-Type: multipart/form-data; boundary={boundary}"
                                          f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return status, answer


def _uploaded_files(app) -> list:
    folder = re.search(r"gradio temp dir (\S+) \(mode 700", app.log())[1]
    return [path for path in Path(folder).rglob("*") if path.is_file()]


@pytest.mark.parametrize("content", [b"A" * 1000, b"", b"<html><script>alert(1)</script></html>"])
def test_an_upload_that_is_not_a_picture_is_refused_and_nothing_is_stored(app, content):
    # The upload route is open for the image editor's pictures only: Gradio's own route stored an empty file, and
    # would store anything else it is sent.
    before = _uploaded_files(app)
    status, answer = _upload(app, "x.html", content)
    assert status == 400, answer[:200]
    error = json.loads(answer)["error"]
    assert error["param"] == "files" and "Upload refused" in error["message"]
    assert _uploaded_files(app) == before
    assert http_status(f"{app.url}/readyz") == 200


def test_an_uploaded_picture_is_stored_privately_and_never_served_back(app):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    status, answer = _upload(app, "picture.png", buffer.getvalue())
    assert status == 200, answer[:200]
    [stored] = json.loads(answer)
    assert Path(stored).read_bytes() == buffer.getvalue()
    relative = os.path.relpath(stored, PROJECT_DIR)  # the app's working directory
    for spelling in (stored, stored.replace("/", "//"), f"{Path(stored).parent}/../{Path(stored).parent.name}/"
                     f"{Path(stored).name}", quote(stored, safe=""), relative):
        status, _, _ = raw_exchange(app, f"GET /gradio_api/file={spelling} HTTP/1.1\r\nHost: localhost\r\n"
                                         f"Connection: close\r\n\r\n".encode())
        assert status == 404, spelling


def test_uploads_past_the_ones_being_taken_are_a_503_busy_until_those_end(app):
    """Clients that send the head of an upload and only part of its body hold the places: the next upload is told
    to come back (Retry-After), and once they hang up, uploads are taken again."""
    head = (f"POST /gradio_api/upload HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
            f"boundary=b\r\nContent-Length: 1000\r\n\r\n").encode()
    slow = []
    for _ in range(UPLOADS_AT_ONCE):
        sock = connect(app)
        sock.sendall(head + b"--b\r\n")  # the rest of the body never comes
        slow.append(sock)
    deadline = time.monotonic() + 10
    while (answer := _upload(app, "x.gif", b"GIF89a"))[0] != 503:
        assert answer[0] == 400 and time.monotonic() < deadline, answer
    status, body = answer
    assert json.loads(body)["error"]["code"] == "busy"
    for sock in slow:
        sock.close()
    wait_until(lambda: _upload(app, "x.gif", b"GIF89a")[0] == 400, 10, "the places given back")


FLOOD = 200  # requests sent at once, pipelined on one connection: past any budget, however slowly they are served


def _pipelined_statuses(app, requests: list[bytes]) -> list[int]:
    """The statuses of `requests` sent back to back on one connection (the last one closes it), in order."""
    with connect(app) as sock:
        sock.sendall(b"".join(requests))
        return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", read_until_closed(sock))]


def test_a_flood_of_the_pages_small_events_is_refused_past_the_rate_and_passes_again_after(app):
    def ui_event(route: str = "run", close: bool = True) -> bytes:
        body = b'{"data": [0], "fn_index": 0, "session_hash": "flood"}'
        head = _head(f"/gradio_api/{route}/predict", f"Content-Length: {len(body)}")
        return (head if close else head.replace(b"Connection: close\r\n", b"")) + body

    statuses = _pipelined_statuses(app, [ui_event(close=False)] * (FLOOD - 1) + [ui_event()])
    assert len(statuses) == FLOOD and statuses[0] == 200 and 429 in statuses and set(statuses) == {200, 429}
    status, headers, body = next(answer for answer in (raw_exchange(app, ui_event()) for _ in range(FLOOD))
                                 if answer[0] == 429)
    assert headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "rate_limited"
    # run/'s alias spends the same budget
    assert 429 in _pipelined_statuses(app, [ui_event("api", close=False)] * (FLOOD - 1) + [ui_event("api")])
    assert http_status(f"{app.url}/readyz") == 200  # other routes are not limited
    deadline = time.monotonic() + 5
    while ui_event()[0] == 429:
        assert time.monotonic() < deadline, "still refused 5 s after the flood"
        time.sleep(0.1)


def test_a_flood_of_page_loads_is_refused_past_the_rate_and_passes_again_after(app):
    paths = ["/", "/config", "/config/", "/gradio_api/info", "/gradio_api/openapi.json"]
    requests = [f"GET {paths[number % len(paths)]} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                for number in range(FLOOD - 1)] + [get_request("/config")]
    statuses = _pipelined_statuses(app, requests)
    assert len(statuses) == FLOOD and statuses[0] == 200 and set(statuses) == {200, 429}
    _, headers, body = next(answer for answer in (raw_exchange(app, get_request("/config")) for _ in range(FLOOD))
                            if answer[0] == 429)
    assert headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "rate_limited"
    # Health checks and the OpenAI route's cheap routes are not counted.
    assert http_status(f"{app.url}/readyz") == 200 and http_status(f"{app.url}/v1/models") == 200
    wait_until(lambda: http_status(f"{app.url}/config") == 200, 5, "a page load served again")


@pytest.mark.parametrize("path, body", [
    ("/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "s" * 1_000}),
    ("/gradio_api/queue/join?session_hash=" + "s" * 1_000, {"data": [], "fn_index": 0}),
    ("/gradio_api/run/predict", {"data": [None], "fn_index": 0, "session_hash": "s" * 100_000}),
])
def test_a_session_named_past_the_limit_is_refused_and_keeps_no_memory(app, path, body):
    from webui.limits import MAX_SESSION_HASH_CHARS

    payload = json.dumps(body).encode()

    def send() -> tuple[int, bytes]:
        with connect(app) as sock:
            sock.sendall(_head(path, f"Content-Length: {len(payload)}") + payload)
            status, _, answer = read_response(sock)
        return status, answer

    answers = []

    def answered_past_the_event_budget() -> bool:
        """run/ spends the server-wide budget of the page's events, which the flood test before may have emptied."""
        answers.append(send())
        return answers[-1][0] != 429

    wait_until(answered_past_the_event_budget, 10, "answered past the page's event budget")
    status, answer = answers[-1]
    assert status == 400
    error = json.loads(answer)["error"]
    assert error["param"] == "session_hash" and str(MAX_SESSION_HASH_CHARS) in error["message"]


def test_a_session_named_as_gradio_client_names_one_is_served(app):
    # One value for each of the event's seven inputs: all null, so the job fails at once, in the engine's check.
    payload = json.dumps({"data": [None] * 7, "fn_index": fn_index_of(app, "generate"),
                          "session_hash": "0f6c7a52-1b2d-4c4e-9a53-8d1f0e6b7c21"}).encode()
    with connect(app) as sock:
        sock.sendall(_head("/gradio_api/queue/join", f"Content-Length: {len(payload)}") + payload)
        status, _, answer = read_response(sock)
    assert status == 200 and "event_id" in json.loads(answer)


def test_new_sessions_past_the_rate_are_refused_and_a_known_one_still_joins(app):
    """Gradio's cache of sessions drops the oldest once full, even one still waiting for its job: new names come
    at a bounded rate. Each join here names a new session, which counts before its missing data is refused."""
    fn_index = fn_index_of(app, "generate")

    def join(name: str) -> int:
        payload = json.dumps({"data": [], "fn_index": fn_index, "session_hash": name}).encode()
        with connect(app) as sock:
            sock.sendall(_head("/gradio_api/queue/join", f"Content-Length: {len(payload)}") + payload)
            return read_response(sock)[0]

    statuses = [join(f"flood-{number}") for number in range(NEW_SESSION_BURST + 50)]
    assert 429 not in statuses[:NEW_SESSION_BURST // 2] and 429 in statuses[NEW_SESSION_BURST:]
    assert join("flood-0") != 429  # a page's, or a client's, next request under its own name
    wait_until(lambda: join(f"after-{time.monotonic()}") != 429, 30, "new sessions served again")


def test_a_session_name_refused_as_new_is_still_new_when_it_comes_again():
    from webui.event_inputs import PageEvents
    from webui.gradio_surface import ROUTE_KEY, classify
    from webui.auth import LOOPBACK
    from webui.limits import GuardGradioCalls, TokenBucket
    from webui.streams import StreamPool

    let_in = []

    async def gradio(scope, _receive, _send):
        let_in.append(scope)

    guard = GuardGradioCalls(gradio, streams=StreamPool(limit=8, per_client=8, loopback=LOOPBACK),
                             page=PageEvents(indices=frozenset({0})))
    guard.new_sessions = TokenBucket(rate=0.0, burst=1)  # one new session, and no more

    def join(name: str) -> int:
        body = json.dumps({"data": [], "fn_index": 0, "session_hash": name}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "query_string": b"",
                 "headers": [], ROUTE_KEY: classify("/gradio_api/queue/join", "POST")[0]}
        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"] if sent else 200

    assert [join("first"), join("second"), join("second"), join("first")] == [200, 429, 429, 200]


def test_a_body_framed_both_by_length_and_by_chunks_is_refused_and_the_connection_closed(app):
    """A smuggling shape: the chunked body ends at once, and what follows it would be a second request to a server
    that reads the chunks, while a proxy in front that read the length saw one."""
    smuggled = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    with connect(app) as sock:
        sock.sendall(f"POST /v1/models HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # the smuggled request was never answered


def test_the_pages_small_events_come_only_through_the_route_that_counts_them(app):
    """Gradio also takes a queue-less event through its queue's routes, where the rate limit would not see it."""
    small = fn_index_of(app, "status_line")
    assert page_events(app)[small]["queue"] is False
    for path, body in (("/gradio_api/queue/join", {"data": [], "fn_index": small, "session_hash": "small"}),
                       ("/gradio_api/call/status_line", {"data": []})):
        payload = json.dumps(body).encode()
        with connect(app) as sock:
            sock.sendall(_head(path, f"Content-Length: {len(payload)}") + payload)
            status, _, answer = read_response(sock)
        assert status == 404 and b"small events" in answer, (path, answer[:200])
    payload = json.dumps({"data": [], "fn_index": small, "session_hash": "small"}).encode()

    def through_run() -> int:
        with connect(app) as sock:
            sock.sendall(_head("/gradio_api/run/status_line", f"Content-Length: {len(payload)}") + payload)
            return read_response(sock)[0]

    statuses = []
    # As the page sends it: served, once the rate limit (which an earlier test may have used up) lets it through.
    wait_until(lambda: statuses.append(through_run()) or statuses[-1] != 429, 10, "the rate limit passing it")
    assert statuses[-1] == 200


@pytest.mark.parametrize("fn_index", ["7", 7.0, " 7", True, 999, -1, [7]])
def test_an_fn_index_that_is_not_the_number_of_an_event_is_refused(app, fn_index):
    """Gradio reads "4" or 4.0 as event 4 (in those shapes an event the page sends elsewhere would get through),
    and fails with a 500 on a number no event has."""
    payload = json.dumps({"data": [], "fn_index": fn_index, "session_hash": "shapes"}).encode()
    with connect(app) as sock:
        sock.sendall(_head("/gradio_api/queue/join", f"Content-Length: {len(payload)}") + payload)
        status, _, answer = read_response(sock)
    assert status == 400 and json.loads(answer)["error"]["param"] == "fn_index"


# The file route's ranges (GuardGradioCalls leaves them to Starlette).
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
