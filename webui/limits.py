"""Bounds on what a caller can make the server do: the size of a request body, and the rate of the UI's small
events."""

from __future__ import annotations

import time

from webui.asgi_errors import openai_error, send_json

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

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # uvicorn's parser has already refused a Content-Length that is not a plain number.
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0
        over = started = False

        async def counting_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
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
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        # OpenAI's error shape on every route: what /v1 clients parse, and short, readable JSON everywhere else.
        # connection: close, so the server stops reading a body it will not use.
        await send_json(send, 413, openai_error(f"The request body is over the limit of {self.limit} bytes.",
                                                "request_too_large"), headers=((b"connection", b"close"),))


# Gradio's route for events that skip the queue: here a page's load (its gallery's history) and the size
# category's dropdown. A person makes a few a minute.
UI_EVENT_PATH = "/gradio_api/run/"
UI_EVENTS_PER_S = 20.0
UI_EVENT_BURST = 60


class LimitUIEventRate:
    """ASGI middleware: at most `rate` of the UI's queue-less events a second (a burst of `burst`) for the whole
    server; past that, 429 at once. Each costs milliseconds of Python in Gradio, on the interpreter the engine's
    thread needs too: 200 clients calling them in a loop (300 a second on 2 cores) slowed a running 512² image
    from 1.4 s to 35 s. Refused here, before Gradio, one costs a fraction of that. No per-client share: behind an
    SSH tunnel or a proxy every client is 127.0.0.1."""

    def __init__(self, app, rate: float = UI_EVENTS_PER_S, burst: int = UI_EVENT_BURST):
        self.app, self.rate, self.burst = app, rate, burst
        self.tokens, self.updated = float(burst), time.monotonic()

    def _take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(UI_EVENT_PATH) and not self._take():
            await send_json(send, 429, openai_error("Too many requests for the page's events; try again in a "
                                                    "moment.", "rate_limited"),
                            headers=((b"retry-after", b"1"),))
            return
        await self.app(scope, receive, send)
