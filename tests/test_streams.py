"""The event-stream pool: alone, behind GuardGradioCalls, and against a real `app.py --demo` flooded with idle
streams over raw sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
import uuid

import anyio
import pytest
from gradio_client import Client

from tests.helpers import connect, generate_over_http, parse_samples, start_demo_app, stop_app, wait_until
from webui.event_inputs import PageEvents
from webui.gradio_surface import ROUTE_KEY, classify
from webui.limits import GuardGradioCalls
from webui.streams import HEARTBEAT, RESULTS, StreamPool

LOOPBACK = "loopback"
MAX_CONNECTIONS = 64
STREAMS = MAX_CONNECTIONS // 2


def test_a_full_pool_ends_its_oldest_idle_stream_for_a_new_one():
    pool = StreamPool(limit=3, per_client=8, loopback=LOOPBACK)
    first, second, third = (pool.open_stream(HEARTBEAT, f"page{n}", LOOPBACK) for n in range(3))
    fourth = pool.open_stream(HEARTBEAT, "page3", LOOPBACK)
    assert fourth is not None and first.ended.is_set() and not second.ended.is_set()
    assert pool.open == [second, third, fourth] and pool.evicted == 1


def test_a_stream_with_a_result_to_come_is_never_ended_to_make_room():
    pool = StreamPool(limit=2, per_client=8, loopback=LOOPBACK)
    pool.joined("page0")
    results = pool.open_stream(RESULTS, "page0", LOOPBACK)
    heartbeat = pool.open_stream(HEARTBEAT, "page0", LOOPBACK)  # its session's results are under way
    assert not pool.can_take_a_join() and pool.open_stream(HEARTBEAT, "page9", LOOPBACK) is None
    assert not results.ended.is_set() and not heartbeat.ended.is_set() and pool.refused == 1
    pool.delivered("page0")  # the result went out: the stream is idle now
    assert pool.can_take_a_join() and pool.open_stream(HEARTBEAT, "page9", LOOPBACK) is not None


def test_a_reconnecting_page_replaces_its_own_stream():
    pool = StreamPool(limit=8, per_client=8, loopback=LOOPBACK)
    old = pool.open_stream(HEARTBEAT, "page0", LOOPBACK)
    new = pool.open_stream(HEARTBEAT, "page0", LOOPBACK)
    assert old.ended.is_set() and pool.open == [new]


def test_an_address_holds_its_share_and_then_ends_its_own_oldest():
    pool = StreamPool(limit=8, per_client=2, loopback=LOOPBACK)
    other = pool.open_stream(HEARTBEAT, "theirs", "198.51.100.1")
    mine = [pool.open_stream(HEARTBEAT, f"mine{n}", "203.0.113.9") for n in range(3)]
    assert mine[0].ended.is_set() and not other.ended.is_set() and len(pool.open) == 3


def _call(guard: GuardGradioCalls, method: str, path: str, body: dict | None = None) -> int:
    payload = json.dumps(body or {}).encode()
    route, _ = classify(path, method)
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "client": ("127.0.0.1", 5555),
             "headers": [(b"content-type", b"application/json")], ROUTE_KEY: route}
    statuses = []

    async def receive():
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(guard(scope, receive, send))
    return statuses[0]


def test_a_join_whose_result_could_get_no_stream_never_reaches_the_queue():
    reached = []

    async def queue(scope, _receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"event_id": "e1"}'})

    pool = StreamPool(limit=1, per_client=8, loopback=LOOPBACK)
    guard = GuardGradioCalls(queue, streams=pool, page=PageEvents(indices=frozenset({0})))
    assert _call(guard, "POST", "/gradio_api/queue/join", {"fn_index": 0, "session_hash": "page0"}) == 200
    assert pool.open_stream(RESULTS, "page0", LOOPBACK) is not None  # delivering: its result is to come
    assert _call(guard, "POST", "/gradio_api/queue/join", {"fn_index": 0, "session_hash": "page1"}) == 503
    assert reached == ["/gradio_api/queue/join"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    running = start_demo_app(tmp_path_factory.mktemp("streams-app"), tiny_models,
                             "--max-connections", str(MAX_CONNECTIONS))
    yield running
    stop_app(running)


def _idle_heartbeat(app) -> socket.socket:
    sock = connect(app, timeout=10)
    sock.sendall(f"GET /gradio_api/heartbeat/{uuid.uuid4().hex[:11]} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def _readyz(app) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{app.url}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.e2e
def test_idle_streams_by_the_hundred_starve_no_request_and_no_page(app):
    """One client opening idle heartbeats under new session names, more than the pool holds: before, the OpenAI
    route and every page's results got 503 while /readyz said 200, and the refused request was still generated."""
    flood = [_idle_heartbeat(app) for _ in range(STREAMS + 8)]
    try:
        status, ready = _readyz(app)
        assert status == 200 and ready["event_streams"]["open"] == STREAMS and ready["event_streams"]["ended"] >= 8
        before = ready["served"]
        answer = generate_over_http(app.url, "a lighthouse through the flood")
        assert answer["data"][0]["b64_json"]
        # A page's way (queue/join, then its session's queue/data), as gradio_client takes it.
        result = Client(app.url, verbose=False).predict("a page through the flood", "1024x1024 ( 1:1 )", 5, False,
                                                        1, 3.0, api_name="/generate")
        assert result[1] == 5
        assert _readyz(app)[1]["served"] == before + 2
        # The streams that made room were ended as a stream ends, not cut: a page's own reconnects.
        first = flood[0]
        first.settimeout(10)
        received = b""
        while chunk := first.recv(4096):
            received += chunk
        assert received.endswith(b"0\r\n\r\n")
        samples = parse_samples(urllib.request.urlopen(f"{app.url}/metrics", timeout=10).read().decode())
        assert samples[("zimage_event_streams_ended_total", ())] >= 8
        assert samples[("zimage_event_streams_open", ())] <= STREAMS
        assert "unhandled error" not in app.log()
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: _readyz(app)[1]["event_streams"]["open"] < STREAMS, 30, "the flood's streams closed")


def test_asking_whether_the_client_left_leaves_no_waiter_behind():
    """Gradio's result stream asks every 10 s, giving up at once (Starlette's is_disconnected): each question left
    two tasks waiting for the life of the stream."""

    async def main():
        pool = StreamPool(limit=4, per_client=4, loopback=LOOPBACK)
        guard = GuardGradioCalls(None, streams=pool, page=PageEvents(indices=frozenset()))
        asked = []

        async def stream_app(_scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(50):
                with anyio.CancelScope() as scope:  # as Starlette's Request.is_disconnected asks
                    scope.cancel()
                    await receive()
                asked.append(len(asyncio.all_tasks()))
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        guard.app = stream_app
        client_left = asyncio.Event()

        async def receive():
            await client_left.wait()
            return {"type": "http.disconnect"}

        async def send(_message):
            pass

        path = "/gradio_api/queue/data"
        route, _ = classify(path, "GET")
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"session_hash=page0",
                 "client": ("127.0.0.1", 5555), "headers": [], ROUTE_KEY: route}
        await guard(scope, receive, send)
        await asyncio.sleep(0)
        return asked, len(asyncio.all_tasks())

    asked, left = asyncio.run(main())
    assert max(asked) <= asked[0] + 1 and left == 1  # only main itself
