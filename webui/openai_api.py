"""OpenAI-compatible image routes: POST /v1/images/generations and GET /v1/models.

A request joins Gradio's queue through Gradio's own REST API (`/gradio_api/call/images`, over loopback), so it waits
in the same line as the UI, under the same queue limit, and the engine validates it as it does the UI's: nothing
here talks to the GPU. What this module does is translate: the OpenAI request shape in, the OpenAI response and
error shapes out.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from pathlib import Path

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from webui import errors

log = logging.getLogger("zimage.openai")

MODEL_ID = "z-image-turbo"
RESPONSE_FORMATS = ("b64_json", "url")
DEFAULT_SIZE = "1024x1024"
GRADIO_CALL = "/gradio_api/call/images"
STATUS_BY_KIND = {errors.INVALID: 400, errors.BUSY: 503, errors.FAILED: 500, errors.INTERNAL: 500}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error_response(error: ApiError) -> JSONResponse:
    body = {"message": error.message, "type": "invalid_request_error" if error.status < 500 else "server_error",
            "param": error.param, "code": "busy" if error.status == 503 else None}
    if error.status >= 500:
        # An id the operator can find in the log next to this failure.
        body["id"] = incident = uuid.uuid4().hex[:8]
        log.warning("images request failed id=%s status=%d message=%r", incident, error.status, error.message)
    return JSONResponse({"error": body}, status_code=error.status)


def _read_body(raw: bytes) -> tuple[list[object], str]:
    """The Gradio call's inputs and the response format, from the JSON body; ApiError(400) names a bad field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body must be JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if "prompt" not in body:
        raise ApiError(400, "prompt is required.", "prompt")
    model = body.get("model")
    if model not in (None, MODEL_ID):
        raise ApiError(400, f"model {model!r} is not served here; this service serves {MODEL_ID!r}.", "model")
    response_format = body.get("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)} "
                            f"(got {response_format!r}).", "response_format")
    size = body.get("size") or DEFAULT_SIZE
    inputs = [body["prompt"], size, body.get("n", 1), body.get("seed"), body.get("steps", None),
              body.get("shift", None)]
    return inputs, response_format


async def _through_the_queue(client: httpx.AsyncClient, inputs: list[object], authorization: str | None):
    """Join Gradio's queue and wait for the result: the list of saved images, or ApiError."""
    headers = {"authorization": authorization} if authorization else {}
    joined = await client.post(GRADIO_CALL, json={"data": inputs}, headers=headers)
    if joined.status_code == 503:
        raise ApiError(503, "The server is busy: the queue is full. Try again in a moment.")
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    async with client.stream("GET", f"{GRADIO_CALL}/{event_id}", headers=headers) as stream:
        event = None
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                data = json.loads(line.removeprefix("data: "))
                if event == "complete":
                    return data[0]
                if isinstance(data, dict) and data.get("error"):
                    raise ApiError(STATUS_BY_KIND.get(data.get("title"), 500), data["error"])
                raise ApiError(500, "The server hit an internal error; the operator's log has the details.")
    raise ApiError(500, "The queue closed the request without a result (is the service stopping?).")


def openai_routes(engine_output_dir: Path, loopback_url: str, started_at: float) -> list[Route]:
    """`loopback_url`: where this same server answers locally, for joining its queue."""
    client = httpx.AsyncClient(base_url=loopback_url, timeout=httpx.Timeout(30.0, read=None))

    async def generations(request: Request):
        try:
            inputs, response_format = _read_body(await request.body())
            images = await _through_the_queue(client, inputs, request.headers.get("authorization"))
        except ApiError as error:
            return _error_response(error)
        except httpx.HTTPError as error:  # the queue's own endpoint failed: a bug or a server going down
            return _error_response(ApiError(500, f"The queue could not take the request ({type(error).__name__})."))
        data = []
        for image in images:
            path = Path(image["path"])
            if not path.resolve().is_relative_to(engine_output_dir.resolve()):
                return _error_response(ApiError(500, "An image was saved outside the output folder."))
            item = {"revised_prompt": None, "seed": image["seed"]}
            if response_format == "b64_json":
                item["b64_json"] = base64.b64encode(path.read_bytes()).decode()
            else:
                item["url"] = f"{str(request.base_url).rstrip('/')}/gradio_api/file={path}"
            data.append(item)
        return JSONResponse({"created": int(time.time()), "data": data})

    async def models(_request: Request):
        return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model",
                                                         "created": int(started_at), "owned_by": "Tongyi-MAI"}]})

    return [Route("/v1/images/generations", generations, methods=["POST"]), Route("/v1/models", models)]
