"""Idle and half-open sockets against a real `app.py --demo` process, over raw sockets: a client library would finish
its headers, which is exactly what these clients do not do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import socket
import time
import urllib.request
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from config import log_lines
from config.settings import SettingsError
from tests.helpers import (
    connect,
    http_status,
    raw_exchange,
    read_until_closed,
    start_demo_app,
    stop_app,
    wait_until,
)
from webui.connections import (
    MAX_BODY_PIECES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    GuardedH11Protocol,
    OccasionalRepeats,
    check_port_free,
)

MAX_CONNECTIONS = 64
HEADER_TIMEOUT_S = 3
SEND_TIMEOUT_S = 5
IDLE_SOCKETS = 300  # more than the cap, and more than the 200 open files the process is started with
PARTIAL_HEAD = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n"  # never the blank line that ends a head


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    app = start_demo_app(tmp_path_factory.mktemp("connections-app"), tiny_models,
                         "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(HEADER_TIMEOUT_S),
                         "--send-timeout", str(SEND_TIMEOUT_S), open_files=200)
    yield app
    stop_app(app)


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset); False while it is still open."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _wait_until_closed(socks: list[socket.socket], deadline_s: float) -> list[socket.socket]:
    """The sockets the server has not closed by the deadline."""
    open_ = list(socks)
    deadline = time.monotonic() + deadline_s
    while open_ and time.monotonic() < deadline:
        open_ = [sock for sock in open_ if not _closed_by_server(sock)]
        time.sleep(0.1)
    return open_


def test_the_open_file_limit_is_raised_to_fit_the_connection_cap(app):
    assert f"connections capped at {MAX_CONNECTIONS}" in app.log()
    assert "open-file limit 384 (hard" in app.log()  # 64 × 2 + 256, up from 200


def test_health_answers_while_hundreds_of_sockets_never_finish_their_heads(app):
    idle = []
    try:
        for _ in range(IDLE_SOCKETS):
            sock = connect(app, timeout=10)
            sock.sendall(PARTIAL_HEAD)
            idle.append(sock)
        for _ in range(5):
            started = time.monotonic()
            assert http_status(f"{app.url}/readyz") == 200
            assert time.monotonic() - started < 2
        # The cap closed the oldest waiting sockets as new ones came: at most the cap is left open.
        still_open = [sock for sock in idle if not _closed_by_server(sock)]
        assert len(still_open) <= MAX_CONNECTIONS
        # ...and the head deadline closes the rest.
        assert _wait_until_closed(still_open, HEADER_TIMEOUT_S + 5) == []
    finally:
        for sock in idle:
            sock.close()
    log = app.log()
    # One line per interval for each kind of refusal, not one per socket.
    assert 1 <= log.count(f"(max_connections={MAX_CONNECTIONS}): closed the oldest") <= 3
    assert 1 <= log.count("sent no complete request (head and body)") <= 3
    assert "out of system resource" not in log


def test_a_request_whose_head_arrived_is_not_dropped_to_make_room(app):
    busy = connect(app)
    body = b'{"prompt": "x", "size": "bad"}'
    busy.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    idle = []
    try:
        for _ in range(2 * MAX_CONNECTIONS):
            sock = connect(app, timeout=10)
            sock.sendall(PARTIAL_HEAD)
            idle.append(sock)
        busy.sendall(body)
        answer = read_until_closed(busy)
        assert answer.startswith(b"HTTP/1.1 400") and b'"param":"size"' in answer
    finally:
        busy.close()
        for sock in idle:
            sock.close()


def test_bodies_that_never_finish_are_closed_and_hold_no_slot_a_probe_needs(app):
    """A complete head and a body that stops short (or trickles): the deadline covers the body too, and past the cap
    the oldest such connection makes room for a health probe."""
    body_head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{")
    stalled = []
    try:
        for _ in range(MAX_CONNECTIONS + 16):
            sock = connect(app, timeout=10)
            sock.sendall(body_head)
            stalled.append(sock)
        for _ in range(5):
            assert http_status(f"{app.url}/readyz") == 200
        assert _wait_until_closed(stalled, HEADER_TIMEOUT_S + 5) == []
    finally:
        for sock in stalled:
            sock.close()
    assert "closed the oldest still sending its request" in app.log()


UNREAD_ANSWER_BYTES = 12 << 20  # a 2048² PNG of noise is 11 MB: far more than the kernel's buffers take in


@pytest.fixture(scope="module")
def large_image(app) -> str:
    """The path of a saved image as large as the largest the service makes (its bytes need not be a picture)."""
    (app.output_dir / "large.png").write_bytes(os.urandom(UNREAD_ANSWER_BYTES))
    return "/v1/images/files/large.png"


def _reading_nothing(app, path: str) -> socket.socket:
    """A client that asks for a large image and reads none of it. Its small receive buffer makes the server's
    writes back up within milliseconds."""
    address = urlsplit(app.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((address.hostname, address.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return sock


def _bytes_until_cut(sock: socket.socket) -> int:
    """What the client can still read once the server has cut it off; fails if the server never ends it."""
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


def test_clients_that_read_nothing_make_room_for_a_probe_past_the_cap(app, large_image):
    """Each holds a connection, its answer stuck in the server's buffers: at the cap, the one whose answer has waited
    unread longest is closed for a new one, as a socket still sending its head would be."""
    unread = [_reading_nothing(app, large_image) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_until(lambda: http_status(f"{app.url}/readyz") == 200, SEND_TIMEOUT_S - 2, "a probe answered")
        for _ in range(5):
            assert http_status(f"{app.url}/readyz") == 200
    finally:
        for sock in unread:
            sock.close()
    assert "cut off the one that has read least of its answer for longest" in app.log()


def test_a_client_that_reads_nothing_is_cut_off_and_its_answer_dropped(app, large_image):
    unread = [_reading_nothing(app, large_image) for _ in range(3)]
    try:
        wait_until(lambda: f"stopped reading its answer for {SEND_TIMEOUT_S} s" in app.log(), SEND_TIMEOUT_S + 10,
                   "a client that stopped reading cut off")
        for sock in unread:
            # A reset, not a close that would still deliver the megabytes the server had buffered for it.
            assert _bytes_until_cut(sock) < UNREAD_ANSWER_BYTES // 8
    finally:
        for sock in unread:
            sock.close()
    assert http_status(f"{app.url}/readyz") == 200


def test_event_streams_hold_at_most_half_the_connections(app):
    """A page keeps one heartbeat stream open while it is shown; a client opening them by the hundred must leave
    room for everything else: past half the connections, each new stream takes the place of the oldest idle one
    (webui.streams), and the streams open never pass that half."""

    def heartbeat(number: int) -> tuple[socket.socket, bytes]:
        sock = connect(app, timeout=10)
        sock.sendall(b"GET /gradio_api/heartbeat/page%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % number)
        return sock, sock.recv(4096)

    streams = []
    try:
        for number in range(MAX_CONNECTIONS // 2 + 4):
            sock, first = heartbeat(number)
            streams.append(sock)
            assert first.startswith(b"HTTP/1.1 200"), first[:100]
        # The four oldest made room, each ended as a stream ends; the rest stay open.
        ended = _wait_until_closed(streams[:4], 10)
        assert ended == [] and _wait_until_closed(streams[4:], 0.5) == streams[4:]
        with urllib.request.urlopen(f"{app.url}/readyz", timeout=10) as response:
            assert json.loads(response.read())["event_streams"]["open"] == MAX_CONNECTIONS // 2
    finally:
        for sock in streams:
            sock.close()


def test_a_pipelined_request_is_not_taken_for_one_still_sending_its_head(app):
    """A request sent right behind another on the same connection has arrived whole: no deadline cuts it while it
    is served, here a stream that stays open."""

    def pipelined() -> tuple[socket.socket, list[bytes]]:
        sock = connect(app, timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"GET /gradio_api/heartbeat/pipelined HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2 and (chunk := sock.recv(4096)):
            answers += chunk
        return sock, re.findall(rb"HTTP/1\.1 (\d{3})", answers)

    attempts = []

    def served() -> bool:
        # The stream pool may still be draining the streams an earlier test closed: a 503 is tried again.
        attempts.append(pipelined())
        return attempts[-1][1] != [b"200", b"503"]

    try:
        wait_until(served, 10, "a heartbeat slot free")
        sock, statuses = attempts[-1]
        assert statuses == [b"200", b"200"]
        assert _wait_until_closed([sock], HEADER_TIMEOUT_S + 2) == [sock]
    finally:
        for sock, _ in attempts:
            sock.close()


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(8000)) + b"\r\n",
    b"GET /healthz?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X: 1\r\n" * MAX_HEADERS + b"\r\n",
], ids=["one-100-kB-header", "8000-headers", "100-kB-request-line", "101-headers"])
@pytest.mark.parametrize("pieces", [1, 40], ids=["whole", "in-pieces"])
def test_a_request_head_over_the_limits_gets_431_and_a_closed_connection(app, head, pieces):
    """Before, such heads were parsed whole (~22 ms of the event loop each) and answered 200."""
    with connect(app, timeout=10) as sock:
        step = -(-len(head) // pieces)
        with contextlib.suppress(OSError):  # the server may close while the rest is still being sent
            for start in range(0, len(head), step):
                sock.sendall(head[start:start + step])
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_a_head_over_the_limits_behind_a_good_request_gets_431(app):
    """Pipelined: the second request waits whole in h11's buffer, and is measured before it is parsed."""
    with connect(app, timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 431 " in answer


def test_a_head_under_the_limits_is_served(app):
    head = (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 100) for n in range(MAX_HEADERS - 2)) + b"\r\n")
    assert len(head) < MAX_HEAD_BYTES
    assert raw_exchange(app, head)[0] == 200


def test_a_kept_alive_connection_that_stalls_in_its_next_head_is_closed(app):
    sock = connect(app, timeout=10)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(PARTIAL_HEAD)  # uvicorn's keep-alive timer stops here: only the head deadline remains
        assert _wait_until_closed([sock], HEADER_TIMEOUT_S + 3) == []
    finally:
        sock.close()


def test_a_chunked_body_cut_into_too_many_pieces_is_cut_off(app):
    """Each piece costs the event loop a parse in Python: a body of a byte a piece is refused by its count, long
    before its size would be."""
    pieces = b"1\r\n \r\n" * (MAX_BODY_PIECES + 1000) + b"0\r\n\r\n"
    sock = connect(app, timeout=10)
    try:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):  # the server may close while the pieces are still going out
            sock.sendall(pieces)
        try:
            answer = read_until_closed(sock)
        except ConnectionResetError:
            answer = b""
    finally:
        sock.close()
    assert answer == b""  # closed, not answered: before, the whole body was read and answered 400
    wait_until(lambda: f"came in more than {MAX_BODY_PIECES} pieces" in app.log(), 10, "the cut logged")
    # The same body in pieces of a few KiB is read whole (and refused only as a request without a prompt).
    body = b" " * (MAX_BODY_PIECES + 1000)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[at:at + 4096]), body[at:at + 4096])
                       for at in range(0, len(body), 4096)) + b"0\r\n\r\n"
    status, _, _ = raw_exchange(app, b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                                     b"Connection: close\r\n\r\n" + chunked)
    assert status == 400
    assert http_status(f"{app.url}/healthz") == 200


@pytest.mark.parametrize("request_bytes, line", [
    (b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n\r\n",
     "Unsupported upgrade request."),
])
def test_requests_uvicorn_complains_of_are_logged_once_an_interval(app, request_bytes, line):
    for _ in range(5):
        raw_exchange(app, request_bytes)
    wait_until(lambda: f"{line} (0 more" in app.log(), 10, "the first one logged")
    assert app.log().count(line) == 1


def test_flooded_lines_are_logged_once_an_interval_each_with_a_count(caplog, monkeypatch):
    now = [1000.0]  # the filter's clock, moved by hand: the thousand errors all fall inside one interval
    monkeypatch.setattr(log_lines, "time", SimpleNamespace(monotonic=lambda: now[0]))
    logger = logging.getLogger("asyncio.test-accept")
    logger.addFilter(OccasionalRepeats(interval_s=1.0))
    caplog.set_level(logging.WARNING, logger="asyncio.test-accept")
    for _ in range(1000):
        logger.error("socket.accept() out of system resource", exc_info=OSError(24, "Too many open files"))
        logger.warning("Exceeded concurrency limit.")
    now[0] += 1.0
    logger.error("socket.accept() out of system resource")
    logger.error("an unrelated error")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["socket.accept() out of system resource (0 more since the last such line)",
                     "Exceeded concurrency limit. (0 more since the last such line)",
                     "socket.accept() out of system resource (999 more since the last such line)",
                     "an unrelated error"]
    assert all(record.exc_info is None for record in caplog.records)


def test_a_port_in_use_is_named_and_a_free_one_passes():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SettingsError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # closed: free again


def test_a_client_reading_a_large_answer_slowly_is_not_cut_off(monkeypatch):
    """An answer written at once (an image as base64) stays backed up until its end however steadily the client
    reads, and asyncio (uvloop too) says the client can take more only then: what is timed is how much it takes."""
    answer_bytes, send_timeout_s, read_per_s = 8 << 20, 1.0, 2 << 20
    monkeypatch.setattr(GuardedH11Protocol, "send_timeout_s", send_timeout_s)

    async def one_large_answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(answer_bytes).encode())]})
        await send({"type": "http.response.body", "body": b"x" * answer_bytes})

    async def read_slowly() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        config = Config(app=one_large_answer, lifespan="off", log_level="warning")
        config.load()
        state = ServerState()
        server = await loop.create_server(lambda: GuardedH11Protocol(config, state, {}), "127.0.0.1", 0)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, server.sockets[0].getsockname())
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            received, started = 0, time.monotonic()
            while received < answer_bytes:
                try:
                    chunk = await loop.sock_recv(sock, 16384)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += len(chunk)
                await asyncio.sleep(len(chunk) / read_per_s)
            return received, time.monotonic() - started
        finally:
            sock.close()
            server.close()

    received, took_s = asyncio.run(read_slowly())
    assert received >= answer_bytes  # the head and the whole body, not a reset part-way
    assert took_s > 2 * send_timeout_s  # it did read across several timeouts' worth of time
