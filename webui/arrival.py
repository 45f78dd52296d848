"""When each request arrived, for the engine to refuse one that waited too long in line for the GPU."""

from __future__ import annotations

import time

import gradio as gr

ARRIVAL_KEY = "zimage_received_at"


class StampArrival:
    """ASGI middleware: note when each HTTP request arrived. Gradio keeps the request that joined its queue with
    the event, but tells the handler nothing of when that was; the engine needs it to refuse requests that waited
    too long."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVAL_KEY] = time.monotonic()
        await self.app(scope, receive, send)


def received_at(request: gr.Request | None) -> float | None:
    """When the request behind a Gradio event arrived (stamped by StampArrival), if known."""
    starlette_request = getattr(request, "request", None)
    return getattr(starlette_request.state, ARRIVAL_KEY, None) if starlette_request is not None else None
