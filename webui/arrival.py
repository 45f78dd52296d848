"""When each request arrived, for the engine to refuse one that waited too long in line for the GPU. Gradio keeps
the request that joined its queue with the event, but tells the handler nothing of when that was."""

from __future__ import annotations

import time

ARRIVAL_KEY = "zimage_received_at"


def stamp_arrival(scope) -> None:
    """Note now as the arrival of the HTTP request `scope` (webui.gradio_surface.ClassifyGradioRoutes does, before
    any body is read)."""
    scope.setdefault("state", {})[ARRIVAL_KEY] = time.monotonic()


def received_at(request) -> float | None:
    """When a request arrived, if known: a Starlette request, or the gr.Request behind a Gradio event (which holds
    Starlette's in `request`)."""
    starlette_request = getattr(request, "request", request)
    state = getattr(starlette_request, "state", None)
    return getattr(state, ARRIVAL_KEY, None)
