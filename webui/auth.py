"""Credentials on every route but the health checks.

Gradio's own `auth=` guards only Gradio's routes, with a cookie its login page sets: it leaves the OpenAI-style
routes and /metrics open, and neither the openai client nor Prometheus can log in through a form. So one ASGI
middleware checks every request instead: HTTP Basic (browsers prompt for it, Prometheus and curl send it) or a
Bearer token "user:password" (what the openai client sends as its API key).
"""

from __future__ import annotations

import base64
import binascii
import hmac

from webui.asgi_errors import openai_error, send_json

USER_KEY = "user"  # request.state key: the user whose credentials the request carried
OPEN_PATHS = ("/healthz", "/readyz")  # local liveness checks (supervisor, load balancers) carry no credentials
# Gradio's launch() calls this over loopback, without credentials, to start its queue; it takes no input.
LOOPBACK_ONLY_OPEN_PATHS = ("/gradio_api/startup-events",)
LOOPBACK_CLIENTS = ("127.0.0.1", "::1")
REALM = "Z-Image-Turbo"


def _presented(headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    value = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "basic":
        try:
            token = base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
    elif scheme.lower() != "bearer":
        return None
    user, colon, password = token.partition(":")
    return (user, password) if colon else None


class RequireCredentials:
    """ASGI middleware: a request without valid credentials gets 401 and never reaches the app."""

    def __init__(self, app, credentials: dict[str, str]):
        self.app = app
        self.credentials = credentials

    def _allowed(self, scope) -> bool:
        """Whether the request may pass; one with valid credentials carries its user in request.state."""
        if scope["path"] in OPEN_PATHS:
            return True
        if scope["path"] in LOOPBACK_ONLY_OPEN_PATHS and (scope.get("client") or ("",))[0] in LOOPBACK_CLIENTS:
            return True
        presented = _presented(scope.get("headers", []))
        if presented is None:
            return False
        expected = self.credentials.get(presented[0], "")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if not (expected and hmac.compare_digest(expected.encode(), presented[1].encode())):
            return False
        scope.setdefault("state", {})[USER_KEY] = presented[0]
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_json(send, 401, openai_error("Authentication required: HTTP Basic, or 'user:password' as the API "
                                                "key.", "invalid_api_key"),
                        headers=((b"www-authenticate", f'Basic realm="{REALM}"'.encode()),))
