"""Answers that ASGI middleware sends itself, before any app runs or after it fails: JSON with its length, and
OpenAI's error shape (what /v1 clients parse, and short, readable JSON on every other route)."""

from __future__ import annotations

import json
import logging
import traceback
import uuid

from starlette.requests import ClientDisconnect

from config.log_lines import TRACEBACK_INTERVAL_S, Occasional, OncePerInterval
from pipeline.requests import shown

log = logging.getLogger("zimage.webui")



def openai_error(message: str, code: str | None, param: str | None = None, status: int = 400) -> dict[str, object]:
    """OpenAI's error body: the caller's mistakes are "invalid_request_error", the server's "server_error"."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_json(send, status: int, payload: object, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class AnswerUnhandledErrors:
    """ASGI middleware: an exception that escapes the app (a Gradio route failing on input it did not expect: an
    unknown API name, once a malformed Range header) becomes a JSON 500 with an incident id, and one ERROR line naming
    the method, the path and the id, with the traceback once a minute for each kind of failure. Without it, uvicorn
    answers a bare "Internal Server Error" and writes some 70 lines of traceback each time: a client repeating the
    request filled the 10 MB log in five seconds. An unknown API name (`unknown_endpoint`, the exception Gradio raises
    for one: webui.gradio_surface.UNKNOWN_ENDPOINT) is the caller's mistake: 404, no traceback.
    A failure after the answer has started can only break it off: a WARNING line an interval, with the count."""

    def __init__(self, app, unknown_endpoint: type[Exception] | tuple[type[Exception], ...] = ()):
        self.app, self.unknown_endpoint = app, unknown_endpoint
        self._tracebacks_due = OncePerInterval(TRACEBACK_INTERVAL_S)
        self._broken_off = Occasional(log)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client went away mid-request (or was cut off for stalling): nobody to answer, nothing wrong
        except Exception as error:
            if isinstance(error, self.unknown_endpoint) and not started:
                await send_json(send, 404, openai_error(f"{shown(scope['path'])} names no API endpoint of this "
                                                        f"service.", None, status=404))
                return
            if started:
                # The answer was under way, so the client got no incident id to quote. Gradio's result streams break
                # off so for a session or an event they no longer know, which any client can ask for in a loop.
                self._broken_off("answer broken off method=%s path=%s error=%s: %s", scope["method"],
                                 shown(scope["path"]), type(error).__name__, shown(str(error)),
                                 exc_info=self._traceback_due(error))
                return
            incident = uuid.uuid4().hex[:8]
            log.error("unhandled error id=%s method=%s path=%s error=%s: %s", incident, scope["method"],
                      shown(scope["path"]), type(error).__name__, shown(str(error)),
                      exc_info=self._traceback_due(error))
            payload = openai_error(f"The server hit an internal error (incident {incident}); the operator's log has "
                                   f"the details.", None, status=500)
            payload["error"]["id"] = incident
            await send_json(send, 500, payload)

    def _traceback_due(self, error: Exception) -> Exception | None:
        """`error` if its kind (its type and the line that raised it: a bounded set, whatever clients send) has not
        shown a traceback within the interval, else None."""
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return error if self._tracebacks_due.due((type(error).__name__, frame.filename, frame.lineno)) else None
