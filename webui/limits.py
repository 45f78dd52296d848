"""Bounds on what a caller can make the server do: the size of a request body (LimitBodySize), and over Gradio's
routes (GuardGradioCalls) the rate of page loads and of the UI's small events (and the route they take), the size of
a session's name, what an event's inputs may be, and the number of open event streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

import anyio
from starlette.routing import Match, Route

from pipeline.requests import shown
from webui.asgi_errors import openai_error, send_json
from webui.auth import client_address
from webui.event_inputs import PageEvents
from webui.gradio_surface import (
    CALL_BY_KEYWORD_PATH,
    CALL_PATH,
    HEARTBEAT_PATH,
    QUEUE_DATA_PATH,
    QUEUE_JOIN_PATH,
    ROUTE_KEY,
    Kind,
)
from webui.streams import HEARTBEAT, RESULTS, StreamPool

# The largest body the service means to take is a JSON request around one prompt of at most 20,000 characters
# (pipeline.requests.MAX_PROMPT_CHARS): under 120 KB even with every character escaped as \uXXXX. The UI's posts to
# Gradio's queue carry the same few fields. 1 MiB leaves room for all of that on every route, and no more.
MAX_BODY_BYTES = 2**20


class BodyTooLarge(Exception):
    """Raised from `receive` once the bytes received pass the limit, so the app stops reading."""


class LimitBodySize:
    """ASGI middleware: a request whose body is over `limit` bytes gets 413 and is never buffered.

    Starlette (so FastAPI and Gradio) has no body limit of its own and uvicorn has none either: without this, every
    route reads whatever it is sent into memory. A declared Content-Length over the limit is refused before a byte
    of the body is read; a chunked body is counted as it streams in and refused the moment it passes the limit.
    """

    def __init__(self, app, limit: int = MAX_BODY_BYTES, larger: Sequence[tuple[Route, int]] = ()):
        """`larger`: routes with a limit of their own (those that take uploads)."""
        self.app = app
        self.limit = limit
        self.larger = larger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next((own for route, own in self.larger if route.matches(scope)[0] == Match.FULL), self.limit)
        headers = dict(scope["headers"])
        # uvicorn's parser has already refused a Content-Length that is not a plain number.
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            # Framed two ways: uvicorn reads the chunks, a proxy in front may have read the length, and the rest of
            # the body would then be a second request it never saw (request smuggling). RFC 9112 6.1: close.
            await send_json(send, 400, openai_error("The request has both Content-Length and Transfer-Encoding; "
                                                    "send one.", None), headers=((b"connection", b"close"),))
            return
        if declared is not None and int(declared) > limit:
            await self._refuse(send, limit)
            return
        received = 0
        over = started = False

        async def counting_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if over:  # the app's answer to a body it never got whole; ours goes instead
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            # Whatever the app made of the cut-off body (FastAPI turns a failed read into a 400) is not the answer.
            if not over:
                raise
        if over and not started:
            await self._refuse(send, limit)

    async def _refuse(self, send, limit: int) -> None:
        # OpenAI's error shape on every route: what /v1 clients parse, and short, readable JSON everywhere else.
        # connection: close, so the server stops reading a body it will not use.
        await send_json(send, 413, openai_error(f"The request body is over the limit of {limit} bytes.",
                                                "request_too_large"), headers=((b"connection", b"close"),))


@dataclass(frozen=True)
class Rated:
    """Requests counted against one server-wide rate: those of Gradio's routes of `kind` (the tag that
    webui.gradio_surface.ClassifyGradioRoutes leaves in the scope), `per_s` a second on average and `burst` at
    once; past that, 429 at once. Each such request costs milliseconds of Python in Gradio, on the interpreter the
    engine's thread needs too; refused before Gradio, one costs a fraction of that. No per-client share: behind an
    SSH tunnel or a proxy every client is 127.0.0.1."""

    what: str  # for the refusal's message: "Too many requests for {what}"
    per_s: float
    burst: int
    kind: Kind

    def counts(self, scope) -> bool:
        route = scope.get(ROUTE_KEY)
        return route is not None and route.kind is self.kind


# A page's load (its gallery's history) and the size category's dropdown: events that skip the queue. A person makes
# a few a minute. 200 clients calling them in a loop (300 a second on 2 cores) slowed a running 512² image from
# 1.4 s to 35 s.
UI_EVENTS = Rated("the page's events", per_s=20.0, burst=60, kind=Kind.SMALL_EVENT)
# Gradio's routes that build the page, its config or its API's description anew for each request, 2-4 ms of Python
# each (a static file or a health check: under 1 ms). Eight clients loading / in a loop slowed a 512² image (2
# steps, 2 cores) from 0.29 s to 3.0 s; limited, to 0.95 s, what as many looping on /healthz cost (1.1 s). A page
# load takes one or two, a gradio_client Client two (it reads the 429 as "too many requests").
PAGE_LOADS = Rated("pages and API descriptions", per_s=20.0, burst=60, kind=Kind.PAGE)
# The page's image editor uploads its picture, its brush layer and their composite when Edit is clicked, and the
# last two again after each brush stroke: a person painting sends a few a second. Each is up to the upload limit and
# written to disk by Gradio, where webui.editor_uploads bounds the room they take.
UPLOADS = Rated("uploads", per_s=10.0, burst=60, kind=Kind.UPLOAD)
UPLOADS_AT_ONCE = 8  # uploads' bodies held in memory at once (each up to the upload limit), then 503


class TokenBucket:
    """`rate` a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# Gradio keeps the state of every session a request names (up to 10,000), keyed by the name the client chooses:
# a 1 MB name costs a megabyte of memory that stays. Gradio's page draws 11 characters, gradio_client a uuid (36).
MAX_SESSION_HASH_CHARS = 128
# Gradio keeps each session's undelivered messages in a cache that drops the oldest session once full, even one
# whose job is still waiting: ~2,100 joins under new names lost another client's result and stopped Gradio's
# progress updates for everyone. Sessions that join and never read stay in it, so new names are limited, and the
# cache is made large enough (webui.server) that filling it at this rate takes longer than any job may wait.
NEW_SESSIONS_PER_S = 10.0
NEW_SESSION_BURST = 100
SESSIONS_KEPT = 12_000  # 20 minutes of new names at NEW_SESSIONS_PER_S, past the queue's timeout (300 s)
# What marks a result delivered on a page's queue/data (Gradio's JSON, as orjson writes it) and on call/NAME/EVENT_ID.
QUEUE_COMPLETIONS = (b'"msg":"process_completed"',)
CALL_COMPLETIONS = (b"event: complete\n", b"event: error\n")
MAX_JOIN_ANSWER_BYTES = 4096  # a join's answer is {"event_id": "<32 hex digits>"}
# The routes whose requests may name a session (in a JSON body, the query string or the heartbeat's path).
NAMES_A_SESSION = frozenset({Kind.STATUS, Kind.SMALL_EVENT, Kind.QUEUED_EVENT, Kind.STREAM})


class GuardGradioCalls:
    """ASGI middleware over Gradio's routes, each by its kind (the row webui.gradio_surface.ClassifyGradioRoutes
    left in the scope); the service's own routes pass untouched:
    - page loads and the page's small events spend the server-wide budgets of `budgets` (Rated), or get 429;
    - a request that names a session (`session_hash` in its JSON body, its query string or the heartbeat's path)
      names it in at most MAX_SESSION_HASH_CHARS characters, or gets 400;
    - a call to one of the page's events (`page`, a webui.event_inputs.PageEvents) names one: an fn_index is a whole
      number (Gradio would read "4" or 4.0 as 4) naming one of the page's events (Gradio fails with a 500 on any
      other), call/v2/NAME one of its API names (the same; call/NAME answers 404 through webui.asgi_errors), or
      404; and its inputs are what Gradio can take (PageEvents.problem), or 400 naming the field;
    - the page's small events come only through run/ (or its alias api/), where their budget counts them; sent
      through the queue's routes instead, which Gradio also takes, they would escape it, so they get 404 there;
    - new sessions join the queue at most NEW_SESSIONS_PER_S a second (a burst of NEW_SESSION_BURST), or get 429:
      a queue/join under a name not seen among the last SESSIONS_KEPT, and every call/NAME (Gradio draws a new
      session for each). A page, or a gradio_client Client, keeps its one name;
    - event streams (heartbeats, a page's queue/data, an API call's call/NAME/EVENT_ID) share `streams`, a
      webui.streams.StreamPool: a stream for which it has no place gets 503, and so does a join while it could not
      give the join's result a stream. Joins let in and results delivered are told to the pool; both go
      uncompressed, so that it can read them;
    - the file route's Range headers are left to Starlette (_ranges_for_starlette);
    - an upload gets 503 while UPLOADS_AT_ONCE others are being taken or `upload_room()` says why there is no
      room for it, and 400 when `upload_problem(content_type, body)` says why its body is not one to store.
    Runs inside LimitBodySize, which bounds the body it reads."""

    def __init__(self, app, streams: StreamPool, page: PageEvents, budgets: tuple[Rated, ...] = (UI_EVENTS,
                                                                                                  PAGE_LOADS),
                 upload_room: Callable[[], str | None] = lambda: "no part of the page takes uploads",
                 upload_problem: Callable[[str, bytes], str | None] = lambda _type, _body: None):
        self.app, self.streams, self.page = app, streams, page
        self.upload_room, self.upload_problem = upload_room, upload_problem
        self.uploads = anyio.Semaphore(UPLOADS_AT_ONCE)  # as the OpenAI route bounds its edits' bodies
        self.budgets = {rated.kind: (rated, TokenBucket(rated.per_s, rated.burst)) for rated in budgets}
        self.small_names = frozenset(page.small.values())
        self.new_sessions = TokenBucket(NEW_SESSIONS_PER_S, NEW_SESSION_BURST)
        self.known_sessions: OrderedDict[str, None] = OrderedDict()

    async def __call__(self, scope, receive, send):
        route = scope.get(ROUTE_KEY) if scope["type"] == "http" else None
        if route is None:  # one of the service's own routes, or no HTTP request
            await self.app(scope, receive, send)
            return
        if (budget := self.budgets.get(route.kind)) is not None and not budget[1].take():
            await send_json(send, 429, openai_error(f"Too many requests for {budget[0].what}; try again in a "
                                                    f"moment.", "rate_limited"), headers=((b"retry-after", b"1"),))
            return
        if route.kind is Kind.FILE:
            await self.app(_ranges_for_starlette(scope), receive, send)
            return
        if route.kind is Kind.UPLOAD:
            await self._upload(scope, receive, send)
            return
        if route.kind not in NAMES_A_SESSION:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        named = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [])
        if path.startswith(HEARTBEAT_PATH):
            named.append(path.removeprefix(HEARTBEAT_PATH))
        fields = {}
        parsed = None
        client_receive = receive  # what the client sends after the body read here
        if scope["method"] == "POST":
            body, receive = await _read_whole(receive)
            parsed = _json_fields(body)
            fields = parsed or {}
            named.append(fields.get("session_hash"))
        if not all(len(name) <= MAX_SESSION_HASH_CHARS for name in named if isinstance(name, str)):
            await send_json(send, 400, openai_error(f"session_hash must be at most {MAX_SESSION_HASH_CHARS} "
                                                    f"characters.", None, "session_hash"))
            return
        fn_index = fields.get("fn_index")
        if fn_index is not None and (isinstance(fn_index, bool) or not isinstance(fn_index, int)
                                     or fn_index not in self.page.indices):
            await send_json(send, 400, openai_error(f"fn_index must be the number of one of the page's events "
                                                    f"(got {shown(fn_index)}).", None, "fn_index"))
            return
        if scope["method"] == "POST" and path.startswith(CALL_BY_KEYWORD_PATH):
            name = path.removeprefix(CALL_BY_KEYWORD_PATH).strip("/")
            if name not in self.page.api_names:
                await send_json(send, 404, openai_error(f"{shown(path)} names no API endpoint of this service.",
                                                        None, status=404))
                return
        if self._small_event_through_the_queue(scope, fields):
            await send_json(send, 404, openai_error("The page's small events are not served through the queue.",
                                                    None, status=404))
            return
        if self._opens_a_session(scope, fields):
            if not self.new_sessions.take():
                await send_json(send, 429, openai_error("Too many new sessions at once; try again in a moment.",
                                                        "rate_limited"), headers=((b"retry-after", b"1"),))
                return
            self._remember_session(fields.get("session_hash"))
        if route.kind is Kind.QUEUED_EVENT and not self.streams.can_take_a_join():
            await _refuse_for_streams(send, self.streams.limit)
            return
        # Last, as Gradio would meet them: a new session or a join refused above counts before its inputs.
        if scope["method"] == "POST" and (problem := self.page.problem(path, parsed)) is not None:
            message, param = problem
            await send_json(send, 400, openai_error(message, None, param))
            return
        if scope["method"] == "POST" and (completed := self.page.completed(path, parsed)) is not None:
            scope, receive = _with_body(scope, client_receive, json.dumps(completed).encode())
        if route.kind is Kind.QUEUED_EVENT:
            await self._join(scope, receive, send, fields)
        elif route.kind is Kind.STREAM:
            await self._stream(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _upload(self, scope, receive, send) -> None:
        if self.uploads.value == 0:
            await send_json(send, 503, openai_error(f"{UPLOADS_AT_ONCE} uploads are being taken; try again in a "
                                                    f"moment.", "busy"), headers=((b"retry-after", b"1"),))
            return
        if (full := self.upload_room()) is not None:
            await send_json(send, 503, openai_error(f"No room for an upload now: {full}.", "busy"),
                            headers=((b"retry-after", b"60"),))
            return
        async with self.uploads:
            body, receive = await _read_whole(receive)
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            if (problem := self.upload_problem(content_type, body)) is not None:
                await send_json(send, 400, openai_error(f"Upload refused: {problem}.", None, "files"))
                return
            await self.app(scope, receive, send)

    async def _join(self, scope, receive, send, fields: dict) -> None:
        """A join into the queue (let in only while its result could have a stream); one let in is told to the pool
        (under its session's name, or for call/NAME its event id, which the answer holds)."""
        answer = {"status": 0, "body": b""}

        async def noting_send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and len(answer["body"]) < MAX_JOIN_ANSWER_BYTES:
                answer["body"] += message.get("body", b"")
            await send(message)

        await self.app(_plain(scope), receive, noting_send)
        if answer["status"] != 200:
            return
        if scope["path"] == QUEUE_JOIN_PATH:
            owner = fields.get("session_hash")
        else:
            owner = (_json_fields(answer["body"]) or {}).get("event_id")
        if isinstance(owner, str):
            self.streams.joined(owner)

    async def _stream(self, scope, receive, send) -> None:
        """An event stream, in the place the pool gives it, and ended cleanly if the pool takes that place back."""
        path = scope["path"]
        if path.startswith(HEARTBEAT_PATH):
            sort, owner = HEARTBEAT, path.removeprefix(HEARTBEAT_PATH)
        elif path == QUEUE_DATA_PATH:
            sort = RESULTS
            owner = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [""])[0]
        else:  # call/NAME/EVENT_ID
            sort, owner = RESULTS, path.rstrip("/").rpartition("/")[2]
        stream = self.streams.open_stream(sort, owner, client_address(scope))
        if stream is None:
            await _refuse_for_streams(send, self.streams.limit)
            return
        completions = QUEUE_COMPLETIONS if path == QUEUE_DATA_PATH else CALL_COMPLETIONS
        lock = asyncio.Lock()  # the app's sends and the ending one never interleave
        state = {"started": False, "finished": False}

        async def counting_send(message):
            async with lock:
                if stream.ended.is_set():
                    raise OSError("event stream ended to make room")  # Starlette: the client is gone
                if message["type"] == "http.response.start":
                    state["started"] = True
                elif message["type"] == "http.response.body":
                    body = message.get("body", b"")
                    if delivered := sum(body.count(marker) for marker in completions):
                        self.streams.delivered(owner, delivered)
                    state["finished"] = not message.get("more_body", False)
                await send(message)

        async def receive_until_ended():
            if stream.ended.is_set():
                return {"type": "http.disconnect"}
            received, ended = asyncio.ensure_future(receive()), asyncio.ensure_future(stream.ended.wait())
            try:
                await asyncio.wait((received, ended), return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Also when the caller gives up at once (Starlette's is_disconnected does, every time it asks): no
                # waiter outlives the call. A message lost so is a disconnect, which uvicorn repeats to every call.
                for waiting in (received, ended):
                    waiting.cancel()
            return received.result() if received.done() and not received.cancelled() else {"type": "http.disconnect"}

        async def finish_when_ended():
            await stream.ended.wait()
            async with lock:
                if state["started"] and not state["finished"]:
                    state["finished"] = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

        finisher = asyncio.ensure_future(finish_when_ended())
        try:
            await self.app(_plain(scope), receive_until_ended, counting_send)
        except Exception:
            if not stream.ended.is_set():
                raise
        finally:
            finisher.cancel()
            self.streams.close(stream)
        if stream.ended.is_set() and not state["started"]:
            await _refuse_for_streams(send, self.streams.limit)

    def _opens_a_session(self, scope, fields: dict) -> bool:
        """Whether this request makes Gradio's queue keep a session it does not know yet."""
        path = scope["path"]
        if scope["method"] != "POST":
            return False
        if path.startswith(CALL_PATH):
            return True
        name = fields.get("session_hash")
        if path != QUEUE_JOIN_PATH or not isinstance(name, str):
            return False
        if name in self.known_sessions:
            self.known_sessions.move_to_end(name)
            return False
        return True

    def _remember_session(self, name: object) -> None:
        """A session let in: its later joins are no new session (a name refused stays new)."""
        if isinstance(name, str):
            self.known_sessions[name] = None
            if len(self.known_sessions) > SESSIONS_KEPT:
                self.known_sessions.popitem(last=False)

    def _small_event_through_the_queue(self, scope, fields: dict) -> bool:
        path, fn_index = scope["path"], fields.get("fn_index")
        if scope["method"] != "POST":
            return False
        if path.startswith(CALL_PATH):
            return path.rstrip("/").rpartition("/")[2] in self.small_names
        return path == QUEUE_JOIN_PATH and isinstance(fn_index, int) and fn_index in self.page.small


def _ranges_for_starlette(scope) -> dict:
    """`scope` with its Range unit written so that Gradio's file route leaves the range to Starlette's FileResponse.

    Gradio's file route answers a `Range: bytes=N-M` with a response of its own (Gradio 6.31's file_fetch): it
    copies every request header into the answer (a client's cookies and credentials come back in it), fails with a
    500 on a range it cannot split in two (`bytes=0-1-2`, or several ranges) and sends a byte for a backwards one.
    Every other Range header it leaves to FileResponse, which parses ranges in full: several at once, suffixes, 400
    for a malformed one, 416 past the end. A range unit is case-insensitive (RFC 9110 §14.1) and Gradio's test for
    it is not, so the unit written "Bytes" sends each range to Starlette."""
    return dict(scope, headers=[(name, _unit_gradio_passes_on(value) if name == b"range" else value)
                                for name, value in scope["headers"]])


def _unit_gradio_passes_on(value: bytes) -> bytes:
    unit, equals, ranges = value.partition(b"=")
    return b"Bytes=" + ranges if equals and unit.strip().lower() == b"bytes" else value


def _plain(scope) -> dict:
    """`scope` without Accept-Encoding: Gradio compresses what it can, and the pool reads joins' answers and counts
    the results a stream delivers. Event streams are small messages; they gain little from it."""
    return {**scope, "headers": [(name, value) for name, value in scope["headers"] if name != b"accept-encoding"]}


async def _refuse_for_streams(send, limit: int) -> None:
    await send_json(send, 503, openai_error(f"Every one of the {limit} event streams is delivering a result; try "
                                            f"again in a moment.", "busy"), headers=((b"retry-after", b"5"),))


def _json_fields(body: bytes) -> dict | None:
    """The fields of a JSON object body; None for anything else (Gradio answers that itself)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


async def _read_whole(receive):
    """The request's whole body, and a `receive` that hands it to the app again, then what the client sends next."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return b"", _replaying([message], receive)
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    return body, _replaying([{"type": "http.request", "body": body, "more_body": False}], receive)


def _with_body(scope, receive, body: bytes):
    """`scope` and `receive` of the same request with `body` in place of the one already read (`receive`: the
    client's, past that body)."""
    headers = [(name, value) for name, value in scope["headers"] if name != b"content-length"]
    return ({**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]},
            _replaying([{"type": "http.request", "body": body, "more_body": False}], receive))


def _replaying(messages: list[dict], receive):
    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay
