"""Whose an image is: the signed-in user's, or else the browser's that asked for it. Galleries show only their
owner's images, so one user never sees another's prompts."""

from __future__ import annotations

import hashlib
import re
import secrets

import gradio as gr

from webui.auth import USER_KEY

BROWSER_ID = re.compile(r"[0-9a-f]{32}")
# localStorage key of the browser's id; fixed, so the id outlives a restart of the service. Gradio sends the
# BrowserState's secret to the browser to obfuscate the stored value: it hides nothing from that browser, and
# needs none. What keeps one browser from claiming another's images is the id itself: 128 random bits.
BROWSER_STORAGE_KEY = "zimage-browser-id"
BROWSER_STORAGE_SECRET = "zimage-browser-id"


def new_browser_id() -> str:
    return secrets.token_hex(16)


def user_of(request: gr.Request | None) -> str | None:
    """The user whose credentials the request carried (webui.auth sets it), or None without --auth."""
    starlette_request = getattr(request, "request", None)
    return getattr(starlette_request.state, USER_KEY, None) if starlette_request is not None else None


def owner_of(request: gr.Request | None, browser_id: object) -> str | None:
    """owner_for the user of a Gradio request."""
    return owner_for(user_of(request), browser_id)


def owner_for(user: str | None, browser_id: object) -> str | None:
    """The owner id saved with an image: the user's when signed in, else the browser's, else None (an API call
    without credentials: its images are returned to it and shown in no gallery). A digest, so a PNG passed on
    does not carry its owner's user name."""
    if user is not None:
        key = f"user:{user}"
    elif isinstance(browser_id, str) and BROWSER_ID.fullmatch(browser_id):
        key = f"browser:{browser_id}"
    else:
        return None
    return hashlib.sha256(key.encode()).hexdigest()[:32]
