"""Refuse what other sites' pages send: a web page the operator visits must neither drive the service nor read it.

Gradio checks no origin itself. Its CORS middleware only withholds `Access-Control-Allow-Origin` from foreign pages
while the Host is localhost; behind a proxy (any other Host) it grants every origin, credentials included (and it
failed with a 500 on an Origin without a Host). And a "simple" cross-site POST (a form, or `Content-Type:
text/plain`) needs no preflight, so the browser sends it anyway and the image is made. Nor does anything guard the
routes we add beside Gradio's (/v1/...). So one ASGI middleware, outside the mounted Gradio app and so before its
CORS middleware, checks every route:
- a request whose `Origin` is another site's is refused (403), whatever its method: browsers send Origin on every
  cross-origin fetch, read or write, and on every POST; a refused one has nothing to read (a preflight from
  another site is refused too, so the browser never sends the request it asked about);
- a state-changing request whose `Referer` is another site's is refused too (older browsers send no Origin); a
  read with one is a link followed or an image embedded elsewhere (no Origin then), and goes on, except on the
  routes with a server-wide budget (`budgeted`: the page loads, webui.limits): there, a request another site's
  page makes that its browser says is no navigation (`Sec-Fetch-Mode` other than navigate; `Sec-Fetch-Site:
  cross-site` counts as another site's even without a Referer) is refused, or a hundred of its <img> tags would
  spend what the operator's page needs;
- on a loopback bind, a request addressed to a name that is not this machine's is refused (403): DNS rebinding,
  a page of evil.example whose name now resolves to 127.0.0.1, so that its Origin and Host agree.

Clients that are not browsers (curl, the openai client, gradio_client, Prometheus, our own loopback call into the
queue) send neither Origin nor Referer, and pass.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from config.log_lines import Occasional
from pipeline.requests import shown
from webui.asgi_errors import openai_error, send_json

log = logging.getLogger("zimage.webui")

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("localhost", "localhost.")


def _netloc(url: str) -> str:
    """host[:port] of a URL, as browsers write it in Host (no default port); '' for "null" or no URL at all."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host
        return ""


def foreign_origin(headers: dict[bytes, bytes]) -> str | None:
    """The origin a browser says the request comes from (Origin, else Referer) if it is another site's; None for
    this server's own pages and for clients that send neither.

    Own origin: the page came from the host[:port] that this request is addressed to (its Host header), which also
    holds when an SSH tunnel maps another local port. The scheme is not compared: behind a TLS proxy the browser's
    Origin says https while this server sees http, and the host with its port already names this server.
    """
    claimed = headers.get(b"origin") or headers.get(b"referer")
    if claimed is None:
        return None
    claimed_text = claimed.decode("latin-1")
    own = headers.get(b"host", b"").decode("latin-1").lower()
    return None if own and _netloc(claimed_text) == own else claimed_text


def host_name(host_header: str) -> str:
    """The name in a Host header (host[:port], IPv6 in brackets), lowercased, without its port; '' if unreadable."""
    try:
        return urlsplit(f"//{host_header}").hostname or ""
    except ValueError:
        return ""


def is_loopback_name(name: str) -> bool:
    """Whether a host name is this machine's loopback: localhost (and its subdomains, which browsers resolve to
    loopback themselves), 127.0.0.0/8 or ::1."""
    if name in LOOPBACK_NAMES or name.endswith((".localhost", ".localhost.")):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RefuseCrossSite:
    """ASGI middleware: what another site's page sends gets 403 and never reaches the app (see the module's
    docstring). `own_hosts`: on a loopback bind, the names besides loopback's a request may be addressed to
    (--public-url's host); None: any name (bound to other machines, or shared, the names clients use cannot be
    known, and credentials guard the service)."""

    def __init__(self, app, own_hosts: frozenset[str] | None = None,
                 budgeted: Callable[[dict], bool] = lambda _scope: False):
        self.app = app
        self.own_hosts = own_hosts
        self.budgeted = budgeted
        # A page the operator visits can send these by the thousand: a line an interval, with the count.
        self._other_hosts = Occasional(log)
        self._cross_site = Occasional(log)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        name = host_name(host)
        # Any port: an SSH tunnel may map another. No Host at all: an HTTP/1.0 client, never a browser.
        if self.own_hosts is not None and host and not (is_loopback_name(name) or name in self.own_hosts):
            self._other_hosts("request for another host refused method=%s path=%s host=%s", scope["method"],
                              shown(scope["path"]), shown(host))
            await self._refuse(scope, send, f"Host {shown(host)} is not this server's name: it serves this machine's "
                                            "loopback address. Behind a reverse proxy, start it with --public-url set "
                                            "to the address clients use.", "forbidden_host")
            return
        origin = foreign_origin(headers)
        if origin is None and headers.get(b"sec-fetch-site") == b"cross-site":
            origin = "another site's page (Sec-Fetch-Site: cross-site)"
        a_read = scope["method"] not in STATE_CHANGING_METHODS and b"origin" not in headers
        # A browser too old to say what a request is for (no Sec-Fetch-Mode) may be following a link: let it.
        mode = headers.get(b"sec-fetch-mode")
        spends_a_budget = self.budgeted(scope) and mode is not None and mode != b"navigate"
        if origin is None or (a_read and not spends_a_budget):
            await self.app(scope, receive, send)
            return
        self._cross_site("cross-site request refused method=%s path=%s origin=%s", scope["method"],
                         shown(scope["path"]), shown(origin))
        await self._refuse(scope, send, "Cross-site request refused: this server only answers its own pages, and "
                                        "clients that send no Origin or Referer header.", "forbidden_origin")

    @staticmethod
    async def _refuse(scope, send, message: str, code: str) -> None:
        payload = openai_error(message, code) if scope["path"].startswith("/v1/") else {"error": message}
        await send_json(send, 403, payload)
