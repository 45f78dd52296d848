"""Refuse cross-site requests that would change state: a web page the operator visits must not drive the service.

Gradio checks no origin itself. Its CORS middleware only withholds `Access-Control-Allow-Origin` from foreign pages
(and only while the Host is localhost), which stops them *reading* a response; a "simple" cross-site POST (a form, or
`Content-Type: text/plain`) needs no preflight, so the browser sends it anyway and the image is made. Nor does
anything guard the routes we add beside Gradio's (/v1/...). So one ASGI middleware checks every route.

Browsers send `Origin` on every cross-site POST; clients that are not browsers (curl, the openai client,
gradio_client, Prometheus, our own loopback call into the queue) send neither Origin nor Referer, and pass.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from webui.asgi_errors import openai_error, send_json

log = logging.getLogger("zimage.webui")

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _netloc(url: str) -> str:
    """host[:port] of a URL, as browsers write it in Host (no default port); '' for "null" or no URL at all."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host
        return ""


def foreign_origin(method: str, headers: dict[bytes, bytes]) -> str | None:
    """The request's origin if it is another site's and the request changes state; None if it may go on.

    Own origin: the page came from the host[:port] that this request is addressed to (its Host header), which also
    holds when an SSH tunnel maps another local port. The scheme is not compared: behind a TLS proxy the browser's
    Origin says https while this server sees http, and the host with its port already names this server.
    """
    if method not in STATE_CHANGING_METHODS:
        return None
    claimed = headers.get(b"origin") or headers.get(b"referer")
    if claimed is None:
        return None
    claimed_text = claimed.decode("latin-1")
    own = headers.get(b"host", b"").decode("latin-1").lower()
    return None if own and _netloc(claimed_text) == own else claimed_text


class RefuseCrossSite:
    """ASGI middleware: a state-changing request from another site's page gets 403 and never reaches the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = foreign_origin(scope["method"], dict(scope.get("headers", [])))
        if origin is None:
            await self.app(scope, receive, send)
            return
        log.warning("cross-site request refused method=%s path=%s origin=%r", scope["method"], scope["path"], origin)
        message = ("Cross-site request refused: this server only accepts state-changing requests from its own "
                   "pages, or from clients that send no Origin or Referer header.")
        payload = openai_error(message, "forbidden_origin") if scope["path"].startswith("/v1/") else {"error": message}
        await send_json(send, 403, payload)
