"""A bound on what a caller can make the server hold: the size of a request body."""

from __future__ import annotations

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
