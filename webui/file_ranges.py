"""Range requests for the images Gradio's file route serves, answered by Starlette's FileResponse."""

from __future__ import annotations

FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")


class RangesByStarlette:
    """ASGI middleware. Gradio's file route answers a `Range: bytes=N-M` with a response of its own
    (gradio.route_utils.file_fetch): it copies every request header into the answer (a client's cookies and
    credentials come back in it), fails with a 500 on a range it cannot split in two (`bytes=0-1-2`, or several
    ranges) and sends a byte for a backwards one. Every other Range header it leaves to Starlette's FileResponse,
    which parses ranges in full: several at once, suffixes, 400 for a malformed one, 416 past the end. A range
    unit is case-insensitive (RFC 9110 §14.1) and Gradio's test for it is not, so the unit written "Bytes" sends
    each range to Starlette; rewriting it is all this class does."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(FILE_ROUTES):
            scope = dict(scope, headers=[(name, _unit_gradio_passes_on(value) if name == b"range" else value)
                                         for name, value in scope["headers"]])
        await self.app(scope, receive, send)


def _unit_gradio_passes_on(value: bytes) -> bytes:
    unit, equals, ranges = value.partition(b"=")
    return b"Bytes=" + ranges if equals and unit.strip().lower() == b"bytes" else value
