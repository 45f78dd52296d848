"""Credentials on every route but the health checks.

Gradio's own `auth=` guards only Gradio's routes, with a cookie its login page sets: it leaves the OpenAI-style
routes and /metrics open, and neither the openai client nor Prometheus can log in through a form. So one ASGI
middleware checks every request instead: HTTP Basic (browsers prompt for it, Prometheus and curl send it) or a
Bearer token "user:password" (what the openai client sends as its API key).

Wrong credentials are logged (a line an interval, with the count) and counted per client address: past
FAILURES_ALLOWED within FAILURE_WINDOW_S, that address's credentials are not even checked until the window has
moved on (429), so a password cannot be guessed at thousands a second. Behind a proxy or a tunnel every client
has the proxy's address: an attack through it then locks out everyone for that minute, which is the price of the
password staying unguessed.

An image link the OpenAI route returns (response_format "url") carries a signature that opens that one file for an
hour without credentials, as OpenAI's own image links do: code that hands the link to a browser or another service
works. The key is drawn at start, so a restart ends the links it signed (the image stays on disk, and fetching it
with credentials still works).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import deque
from urllib.parse import parse_qs

from config.log_lines import Occasional
from pipeline.requests import shown
from webui.asgi_errors import openai_error, send_json
from webui.origin import is_loopback_name

log = logging.getLogger("zimage.auth")

USER_KEY = "user"  # request.state key: the user whose credentials the request carried
OPEN_PATHS = ("/healthz", "/readyz")  # local liveness checks (supervisor, load balancers) carry no credentials
LOOPBACK = "loopback"  # every loopback client's address, as one
REALM = "Z-Image-Turbo"
FAILURES_ALLOWED = 20  # wrong credentials from one address within the window; a person mistyping makes a few
FAILURE_WINDOW_S = 60.0
MAX_ADDRESS_CHARS = 64  # an IPv6 address with its zone is under 64
MAX_ADDRESSES = 10_000  # addresses with recent failures remembered; past it those not locked out are forgotten
IMAGE_ROUTE = "/v1/images/files/"  # the OpenAI route's image links (webui/openai_api.py)
LINK_LIFETIME_S = 3600  # as OpenAI's image links


class LinkSigner:
    """Signs links to saved images so that each opens its one file, for LINK_LIFETIME_S, without credentials."""

    def __init__(self):
        self._key = secrets.token_bytes(32)

    def query(self, path: str) -> str:
        """The query string that opens `path` (a request path as the server will see it, percent-decoded)."""
        expires = int(time.time()) + LINK_LIFETIME_S
        return f"expires={expires}&signature={self._signature(path, expires)}"

    def opens(self, path: str, query_string: bytes) -> bool:
        query = parse_qs(query_string.decode("latin-1"))
        expires, signature = query.get("expires", [""])[0], query.get("signature", [""])[0]
        if not (expires.isascii() and expires.isdigit()) or len(expires) > 12 or int(expires) < time.time():
            return False
        return hmac.compare_digest(self._signature(path, int(expires)), signature)

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


MALFORMED = ("", "")  # credentials that cannot be read: wrong ones, refused and counted as any wrong ones are


def _presented(headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    """The user and password that the Authorization header carries; None without one. One that cannot be read
    (another scheme, not base64, not UTF-8, no colon) is MALFORMED."""
    value = dict(headers).get(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() == "basic":
        try:
            token = base64.b64decode(token, validate=True).decode()
        except ValueError:  # binascii.Error, UnicodeDecodeError, and text that is not ASCII are all ValueErrors
            return MALFORMED
    elif scheme.lower() != "bearer":
        return MALFORMED
    user, colon, password = token.partition(":")
    return (user, password) if colon else MALFORMED


class RequireCredentials:
    """ASGI middleware: a request without valid credentials gets 401 and never reaches the app; an address that
    keeps sending wrong ones gets 429 for a while (see the module's docstring)."""

    def __init__(self, app, credentials: dict[str, str], links: LinkSigner | None = None):
        self.app = app
        self.credentials = credentials
        self.links = links
        self._failures: dict[str, deque[float]] = {}
        self._wrong = Occasional(log)
        self._locked = Occasional(log)

    def _open(self, scope) -> bool:
        path = scope["path"]
        if path.startswith(IMAGE_ROUTE) and self.links is not None and scope.get("method") in ("GET", "HEAD"):
            return self.links.opens(path, scope.get("query_string", b""))
        return path in OPEN_PATHS

    def _valid(self, scope, presented: tuple[str, str]) -> bool:
        """Whether the credentials are right; right ones put their user in request.state."""
        expected = self.credentials.get(presented[0], "")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if not (expected and hmac.compare_digest(expected.encode(), presented[1].encode())):
            return False
        scope.setdefault("state", {})[USER_KEY] = presented[0]
        return True

    def _recent_failures(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address, deque())
        while failures and failures[0] <= now - FAILURE_WINDOW_S:
            failures.popleft()
        return failures

    def _count_failure(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= MAX_ADDRESSES:
            # Forget the addresses not locked out (so many addresses failing at once can free none that is).
            for known in list(self._failures):
                if len(self._recent_failures(known, now)) < FAILURES_ALLOWED:
                    del self._failures[known]
        self._failures.setdefault(address, deque()).append(now)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._open(scope):
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if sum(name == b"authorization" for name, _ in headers) > 1:
            # Which one counts would differ between this check (the last) and code reading the first: refuse both.
            await self._refuse(send, 400, "Send one Authorization header, not several.", "invalid_request")
            return
        presented = _presented(headers)
        address, now = client_address(scope), time.monotonic()
        failures = self._recent_failures(address, now) if presented is not None else deque()
        if len(failures) >= FAILURES_ALLOWED:
            wait_s = math.ceil(failures[0] + FAILURE_WINDOW_S - now)
            self._locked("credentials from %s not checked: %d wrong in the last %.0f s", shown(address), len(failures),
                         FAILURE_WINDOW_S)
            await self._refuse(send, 429, f"Too many wrong credentials from this address; try again in "
                                                 f"{wait_s} s.", "rate_limited", (b"retry-after", str(wait_s).encode()))
            return
        if presented is not None and self._valid(scope, presented):
            await self.app(scope, receive, send)
            return
        if presented is not None:
            self._count_failure(address, now)
            self._wrong("wrong credentials refused user=%s client=%s path=%s", shown(presented[0]), shown(address),
                        shown(scope["path"]))
        await self._refuse(send, 401, "Authentication required: HTTP Basic, or 'user:password' as the API "
                                             "key.", "invalid_api_key",
                           (b"www-authenticate", f'Basic realm="{REALM}"'.encode()))

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str, *headers: tuple[bytes, bytes]) -> None:
        await send_json(send, status, openai_error(message, code), headers=headers)


def client_address(scope) -> str:
    """The client's address, with all of loopback as one: a local user can send from any of 127.0.0.0/8."""
    address = (scope.get("client") or ("",))[0]
    # Cut: behind a --trusted-proxy, the address is what the proxy's X-Forwarded-For said, and each one seen is
    # kept for a minute.
    return LOOPBACK if is_loopback_name(address) else address[:MAX_ADDRESS_CHARS]
