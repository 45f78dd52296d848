"""Answers that ASGI middleware sends itself, before any app runs: JSON with its length, and OpenAI's error shape
(what /v1 clients parse, and short, readable JSON on every other route)."""

from __future__ import annotations

import json


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
