"""OpenAI-compatible image routes: POST /v1/images/generations and /v1/images/edits, GET /v1/models, and the
service's GET /v1/loras.

A request waits in the same admission line as the UI's (webui.admission), under the same queue limit, and the engine
validates it as it does the UI's (webui.jobs.make_images, the UI's /images endpoint too): nothing here talks to the
GPU. What this module does is translate: the OpenAI request shape in, the OpenAI response and error shapes out,
the field a 400 names as the validator named it. It checks the JSON's own types here (no NaN, no lone surrogates,
no unknown keys, a string where a string belongs), so that no hostile value reaches the queue or comes back whole
in a message.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import anyio
import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Match, Route

from config.log_lines import Occasional
from pipeline.metrics import ServiceMetrics
from pipeline.engine_types import GenerationError, ServiceBusy
from pipeline.requests import RequestError, checked_prompt, shown
from pipeline.storage import OUTPUT_FORMATS
from pipeline.uploads import read_image, read_mask
from webui.admission import AdmissionLine
from webui.arrival import received_at
from webui.asgi_errors import openai_error
from webui.auth import IMAGE_ROUTE, USER_KEY, LinkSigner
from webui.jobs import make_images
from webui.multipart import FormError, boundary_of, read_form
from webui.owners import owner_for

log = logging.getLogger("zimage.openai")
REFUSALS_LOGGED_PER_INTERVAL = 50  # refusals before the queue, each logged up to this many every 10 s

MODEL_ID = "z-image-turbo"
RESPONSE_FORMATS = ("b64_json", "url")
DEFAULT_SIZE = "1024x1024"
SIZE_PATTERN = re.compile(r"[0-9]{1,5}x[0-9]{1,5}")  # OpenAI's "WIDTHxHEIGHT"; five digits is past any size served
MAX_DIGITS = 30  # the longest whole number this route reads is a seed below 2**64: 20 digits
# The fields this route reads: OpenAI's, then this service's own (sent by the openai client through extra_body).
FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "background",
          "stream", "seed", "steps", "shift", "loras")
# An edit's form: the same, its picture and mask (files), and its strength. OpenAI's client sends a list of
# pictures as "image[]"; one is edited here.
EDIT_FIELDS = (*FIELDS, "image", "image[]", "mask", "strength")
# Fields of OpenAI's images API taken but not acted on. They tune the picture (quality, style, moderation,
# input_fidelity), name the caller (user, and safety_identifier, which the client offers in its place), or apply to
# streams (partial_images). The official client sends each one its caller passes, so refusing them would break
# working code for no gain; none changes the shape of the answer. Any other key gets a 400, as OpenAI itself answers
# "Unknown parameter", so that a typo such as "step" is not silently dropped.
IGNORED_FIELDS = ("quality", "style", "user", "safety_identifier", "moderation", "partial_images", "input_fidelity")
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}  # the files the engine saves
UPLOAD_ROUTES = ("/v1/images/edits",)  # routes whose bodies carry pictures: webui.server gives them a larger limit
UPLOADS_AT_ONCE = 4  # edits' bodies read and decoded at once (each up to two uploads): what bounds their memory
PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # what may be echoed as an unknown key's `param`
BUSY_RETRY_AFTER_S = 2  # a full queue drains at about an image a second; clients honour Retry-After
UNMATCHED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")  # OPTIONS stays Gradio's CORS preflight
# The engine's fields that this route's request calls otherwise: width and height come from size.
PARAM_BY_FIELD = {"width": "size", "height": "size"}


class FastJSONResponse(JSONResponse):
    """JSON through orjson. An image in b64_json is megabytes of text, which the standard library's encoder scans
    character by character: 18 ms for a 1024² PNG's 3.5 MiB, against 3 ms here, on every request."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(error: ApiError, headers: dict[str, str] | None = None,
                    cause: BaseException | None = None) -> FastJSONResponse:
    """The error's answer; one the server is to blame for gets an incident id, logged with `cause`'s traceback."""
    payload = openai_error(error.message, error.code, error.param, error.status)
    if error.status >= 500 and error.code != "busy":
        # An id the operator can find in the log next to this failure.
        payload["error"]["id"] = incident = uuid.uuid4().hex[:8]
        log.warning("images request failed id=%s status=%d message=%r", incident, error.status, error.message,
                    exc_info=cause)
    return FastJSONResponse(payload, status_code=error.status, headers=headers)


def _is_json(content_type: str) -> bool:
    """application/json, with no charset or UTF-8 (JSON is UTF-8: RFC 8259)."""
    media_type, *parameters = (part.strip().lower() for part in content_type.split(";"))
    charsets = [value.strip('"') for name, _, value in (p.partition("=") for p in parameters) if name == "charset"]
    return media_type == "application/json" and all(charset in ("utf-8", "utf8") for charset in charsets)


class _NotANumber:
    """What the parser leaves where the body holds a number this route does not read: NaN and Infinity (Python's
    json takes them, JSON does not), one past a float's range, or one too long to parse. The field check names
    the field that holds it."""

    def __init__(self, text: str):
        self.what = f"{shown(text)} is not a number this service reads"


def _whole(text: str) -> int | _NotANumber:
    return int(text) if len(text.lstrip("-")) <= MAX_DIGITS else _NotANumber(text)


def _real(text: str) -> float | _NotANumber:
    number = float(text)
    return number if math.isfinite(number) else _NotANumber(text)


def _parse(raw: bytes) -> dict:
    """The body as a JSON object, or ApiError(400)."""
    try:
        # surrogateescape: bytes that are not UTF-8 become lone surrogates, so the field check can name the field
        # that holds them instead of refusing the whole body without saying where. utf-8-sig: a byte order mark,
        # which some Windows tools write, is dropped (RFC 8259 lets a parser ignore it).
        body = json.loads(raw.decode("utf-8-sig", "surrogateescape"), parse_constant=_NotANumber, parse_int=_whole,
                          parse_float=_real)
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply; send a flat JSON object.") from None
    except ValueError:
        raise ApiError(400, "The request body must be JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    unknown = next((key for key in body if key not in FIELDS and key not in IGNORED_FIELDS), None)
    if unknown is not None:
        raise ApiError(400, f"Unknown parameter: {shown(unknown)}.",
                       unknown if PARAMETER_NAME.fullmatch(unknown) else None, "unknown_parameter")
    return body


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field(body: dict, name: str, accepted: Callable[[object], bool], expected: str) -> object:
    """body[name] (None when absent or null), checked for its JSON type here so that no value of the wrong type
    reaches a message that echoes it whole; the engine checks ranges and meaning."""
    value = body.get(name)
    if isinstance(value, _NotANumber):
        raise ApiError(400, f"{name} must be {expected}; {value.what}.", name)
    if value is not None and not accepted(value):
        raise ApiError(400, f"{name} must be {expected} (got {shown(value)}).", name)
    return value


def _read_body(raw: bytes) -> tuple[list[object], str, dict[str, object]]:
    """make_images' inputs, the response format and the output's, from the JSON body; ApiError(400) names a bad
    field."""
    return _read_fields(_parse(raw))


def _read_fields(body: dict) -> tuple[list[object], str, dict[str, object]]:
    """As _read_body, from the body's fields (an edit's form, read as JSON would have typed it)."""
    if body.get("prompt") is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    _field(body, "prompt", lambda value: isinstance(value, str), "text")
    try:
        # Checked here as the engine checks it, before the queue: a prompt of a megabyte goes no further, and the
        # stripped prompt is what joins the queue.
        prompt = checked_prompt(body["prompt"])
    except RequestError as error:
        raise ApiError(400, str(error), "prompt") from None
    _field(body, "model", lambda value: value == MODEL_ID, f"{MODEL_ID!r}, the one model served here")
    output = {"output_format": _field(body, "output_format", lambda value: value in OUTPUT_FORMATS,
                                      f"one of {', '.join(OUTPUT_FORMATS)}") or "png",
              "output_compression": _field(body, "output_compression", _number, "a whole number from 0 to 100")}
    _field(body, "background", lambda value: value in ("auto", "opaque"),
           "'auto' or 'opaque': the images have no transparency")
    _field(body, "stream", lambda value: value is False, "false: the images come back whole, in one response")
    response_format = _field(body, "response_format", lambda value: value in RESPONSE_FORMATS,
                             f"one of {', '.join(RESPONSE_FORMATS)}") or "b64_json"
    size = _field(body, "size", lambda value: isinstance(value, str) and bool(SIZE_PATTERN.fullmatch(value)
                                                                             or value == "auto"),
                  "'auto' or WIDTHxHEIGHT, such as 1024x1024")
    n = _field(body, "n", _number, "a whole number")
    loras = _field(body, "loras", lambda value: isinstance(value, list), 'a list of {"name": ..., "scale": ...}')
    for index, item in enumerate(loras or []):
        if isinstance(item, dict) and isinstance(item.get("scale"), _NotANumber):
            raise ApiError(400, f"loras[{index}].scale must be a number; {item['scale'].what}.", "loras")
    inputs = [prompt, DEFAULT_SIZE if size in (None, "auto") else size, 1 if n is None else n,
              _field(body, "seed", lambda value: _number(value) or value == "random", "a whole number or 'random'"),
              _field(body, "steps", _number, "a whole number"), _field(body, "shift", _number, "a number"), loras]
    return inputs, response_format, output


_FORM_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")
_FORM_NUMBER_FIELDS = ("n", "seed", "steps", "shift", "strength", "output_compression")


def _form_value(name: str, text: str) -> object:
    """A form field's text as the JSON route would have it typed: numbers, false and true, the loras list. Text
    that is none of these stays text, for the field check to name."""
    if name in _FORM_NUMBER_FIELDS and _FORM_NUMBER.fullmatch(text.strip()):
        number = text.strip()
        return _whole(number) if number.lstrip("-").isdigit() else _real(number)
    if name == "stream" and text in ("true", "false"):
        return text == "true"
    if name == "loras":
        try:
            return json.loads(text, parse_constant=_NotANumber)
        except (ValueError, RecursionError):
            raise ApiError(400, 'loras must be JSON text: [{"name": ..., "scale": ...}].', "loras") from None
    return text


def _read_edit_form(body: bytes, boundary: bytes) -> tuple[dict[str, object], dict[str, memoryview | bytes]]:
    """The edit's fields, typed as the JSON route's are, and its files (image, mask); ApiError(400) names a bad
    one."""
    try:
        parts = read_form(body, boundary)
    except FormError as error:
        raise ApiError(400, str(error)) from None
    fields: dict[str, object] = {}
    files: dict[str, memoryview | bytes] = {}
    for part in parts:
        name = "image" if part.name == "image[]" else part.name
        if name not in EDIT_FIELDS and name not in IGNORED_FIELDS:
            raise ApiError(400, f"Unknown parameter: {shown(part.name)}.",
                           part.name if PARAMETER_NAME.fullmatch(part.name) else None, "unknown_parameter")
        if name in ("image", "mask"):
            if name in files:
                raise ApiError(400, f"Send one {name}: this service edits one picture at a time.", name)
            files[name] = part.data
            continue
        if name in fields:
            raise ApiError(400, f"{name} is given twice; send it once.", name)
        try:
            fields[name] = _form_value(name, part.text())
        except FormError as error:
            raise ApiError(400, str(error), name) from None
    if "image" not in files:
        raise ApiError(400, "Missing required parameter: 'image' (the picture to edit, as a file).", "image",
                       "missing_required_parameter")
    return fields, files


def openai_routes(engine, line: AdmissionLine, public_url: str, started_at: float, deliveries,
                  metrics: ServiceMetrics, links: LinkSigner | None = None, *, max_upload_bytes: int,
                  max_upload_pixels: int) -> list[Route]:
    """`engine` makes the images, in `line`. `public_url`: the base of the image URLs it returns (configured, never
    taken from the request's Host header, which any client can forge). An edit's uploads are each at most
    `max_upload_bytes` and `max_upload_pixels`.
    `deliveries` counts each generation request from its arrival until its answer has been sent (Starlette runs a
    response's background task after the last byte), so a shutdown can wait for it. A request refused here, before
    the queue, is counted in `metrics` and logged as the engine does its own refusals. `links`: with credentials
    on, what signs image links so that they open without them."""
    output_root = engine.output_dir.resolve()
    refused_busy = Occasional(log)
    # Each refusal is logged while they come at a person's or a buggy script's pace; a client sending them in a
    # loop (any loopback client, without --auth) would otherwise rotate the log within minutes.
    refused = Occasional(log, level=logging.INFO, times=REFUSALS_LOGGED_PER_INTERVAL)

    uploads = anyio.Semaphore(UPLOADS_AT_ONCE)

    def delivered(route):
        async def counted(request: Request):
            deliveries.begin()
            try:
                response = await route(request)
            except BaseException:
                deliveries.end()
                raise
            response.background = BackgroundTask(deliveries.end)
            return response
        return counted

    def refusal(error: ApiError) -> FastJSONResponse:
        refused("images request refused status=%d param=%s reason=%r", error.status, error.param, error.message)
        busy = error.code == "busy"
        metrics.request_finished("busy" if busy else "rejected")
        return _error_response(error, headers={"retry-after": str(BUSY_RETRY_AFTER_S)} if busy else None)

    async def generations(request: Request):
        # Only JSON: a text/plain or form body is what a cross-site HTML form, or fetch without a preflight, can
        # send; refusing it before the body is read keeps such requests from ever reaching the queue.
        content_type = request.headers.get("content-type", "")
        try:
            if not _is_json(content_type):
                raise ApiError(415, f"Send the body as JSON, with Content-Type: application/json "
                                    f"(got {shown(content_type)}).")
            inputs, response_format, output = _read_body(await request.body())
        except ApiError as error:
            return refusal(error)
        return await _images(request, inputs, response_format, output)

    async def edits(request: Request):
        """OpenAI's edit: a multipart form with the picture ("image"), optionally a mask whose transparent pixels
        mark what to repaint, and the generation's fields (strength too). Cross-site forms are refused before this
        (webui.origin)."""
        content_type = request.headers.get("content-type", "")
        try:
            boundary = boundary_of(content_type)
            if boundary is None:
                raise ApiError(415, f"Send the edit as multipart/form-data, with the picture in the field image "
                                    f"(got {shown(content_type)}).")
            if uploads.value == 0:
                raise ApiError(503, "The server is busy reading other uploads; try again in a moment.", code="busy")
            async with uploads:
                fields, files = _read_edit_form(await request.body(), boundary)
                inputs, response_format, output = _read_fields(fields)
                picture = await anyio.to_thread.run_sync(_read_upload, files, "image", None)
                mask = None
                if "mask" in files:
                    mask = await anyio.to_thread.run_sync(_read_upload, files, "mask",
                                                          (picture.shape[1], picture.shape[0]))
        except ApiError as error:
            return refusal(error)
        if fields.get("size") in (None, "auto"):
            inputs[1] = None  # the picture's own size (pipeline.requests.edit_size)
        return await _images(request, inputs, response_format,
                             {**output, "image": picture, "mask": mask, "strength": fields.get("strength")})

    def _read_upload(files: dict[str, memoryview | bytes], name: str, size: tuple[int, int] | None):
        try:
            if size is None:
                return read_image(files[name], name, max_bytes=max_upload_bytes, max_pixels=max_upload_pixels)
            return read_mask(files[name], name, size, max_bytes=max_upload_bytes, max_pixels=max_upload_pixels)
        except RequestError as error:
            raise ApiError(400, str(error), error.field) from None

    async def _images(request: Request, inputs: list[object], response_format: str,
                      options: dict[str, object]) -> FastJSONResponse:
        joined = time.perf_counter()
        try:
            images = await make_images(line, engine, *inputs, received_at=received_at(request),
                                       owner=owner_for(getattr(request.state, USER_KEY, None), None), **options)
        except RequestError as error:
            return _error_response(ApiError(400, str(error), PARAM_BY_FIELD.get(error.field, error.field)))
        except ServiceBusy as error:
            # Not a failure, so no incident id: any client can ask while the queue is full, as fast as it likes.
            refused_busy("images request refused as busy: %s", error)
            return _error_response(ApiError(503, str(error), code="busy"),
                                   headers={"retry-after": str(BUSY_RETRY_AFTER_S)})
        except GenerationError as error:
            return _error_response(ApiError(500, str(error)))
        except Exception as error:
            return _error_response(ApiError(500, "The server hit an internal error; the operator's log has the "
                                                 "details. Try again."), cause=error)
        answered = time.perf_counter()
        data = []
        for image in images:
            path = Path(image["file"]).resolve()
            if not path.is_relative_to(output_root):
                return _error_response(ApiError(500, "An image was saved outside the output folder."))
            item = {"revised_prompt": None, "seed": image["seed"], "loras": image["loras"]}
            if response_format == "b64_json":
                item["b64_json"] = base64.b64encode(path.read_bytes()).decode()
            else:
                # Relative to the output dir, so a link tells nobody where the server keeps its files; percent-
                # encoded, since a name may hold a space or a '#', which a client would cut the link at.
                name = path.relative_to(output_root).as_posix()
                item["url"] = f"{public_url.rstrip('/')}{IMAGE_ROUTE}{quote(name)}"
                if links is not None:
                    item["url"] += "?" + links.query(f"{IMAGE_ROUTE}{name}")
            data.append(item)
        # The engine's id of each image, as the log's request lines name them: what a caller quotes to the operator.
        response = FastJSONResponse({"created": int(time.time()), "output_format": options["output_format"],
                                     "data": data},
                                    headers={"x-request-id": ",".join(image["id"] for image in images)})
        # The HTTP side of the request's time, beside the engine's own line: the queue (with the engine's run in it)
        # and building the answer (reading, encoding, serializing the images).
        log.info("images answered n=%d format=%s queue_ms=%.0f respond_ms=%.0f bytes=%d", len(data), response_format,
                 (answered - joined) * 1000, (time.perf_counter() - answered) * 1000, len(response.body))
        return response

    the_model = {"id": MODEL_ID, "object": "model", "created": int(started_at), "owned_by": "Tongyi-MAI"}

    async def models(_request: Request):
        return FastJSONResponse({"object": "list", "data": [the_model]})

    async def loras(_request: Request):
        """The LoRA adapters requests may name (the engine looks at its folder again for this)."""
        adapters = await anyio.to_thread.run_sync(engine.adapters)
        return FastJSONResponse({"object": "list", "data": [
            {"name": info.name, "rank": info.rank, "size_bytes": info.size_bytes, "layers": info.layers,
             "hash": info.short_hash} for info in adapters]})

    async def model(request: Request):
        """One model by its id, as clients check that the model they were configured with exists."""
        if request.path_params["model"] == MODEL_ID:
            return FastJSONResponse(the_model)
        return _error_response(ApiError(404, f"The model {shown(request.path_params['model'])} does not exist; "
                                             f"this service serves {MODEL_ID!r}.", "model", "model_not_found"))

    async def image_file(request: Request):
        """A saved image, by its path under the output dir (what the links of url-format answers name); Starlette's
        FileResponse serves ranges of it too. Nothing but an image the engine saved there: no other file, no partial
        write (those end in .tmp), no path out of the dir."""
        name = request.path_params["name"]
        path = output_root / name
        try:
            # An absolute name would replace the output dir in the join: a client could confirm where it is.
            saved = (not name.startswith("/") and path.suffix in MEDIA_TYPES
                     and path.resolve().is_relative_to(output_root) and path.is_file())
        except (ValueError, OSError):  # a NUL byte, a name too long for the file system: no such image either
            saved = False
        if not saved:
            return _error_response(ApiError(404, f"No image {shown(name)} is saved here.", code="image_not_found"))
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    routes = [Route("/v1/images/generations", delivered(generations), methods=["POST"]),
              Route(UPLOAD_ROUTES[0], delivered(edits), methods=["POST"]), Route("/v1/models", models),
              Route("/v1/loras", loras),
              Route("/v1/models/{model}", model),
              Route(IMAGE_ROUTE + "{name:path}", image_file, methods=["GET", "HEAD"])]

    async def unmatched(request: Request):
        """Any other method or path under /v1/: the 405 or 404 an OpenAI client can read, not Starlette's text."""
        path = request.url.path
        allowed = next((route.methods for route in routes if route.matches(request.scope)[0] == Match.PARTIAL), None)
        if allowed:
            return _error_response(ApiError(405, f"{request.method} is not allowed on {shown(path)}; use "
                                                 f"{' or '.join(sorted(allowed))}."),
                                   headers={"allow": ", ".join(sorted(allowed))})
        return _error_response(ApiError(404, f"Invalid URL ({request.method} {shown(path)}): this service serves "
                                             f"{', '.join(route.path for route in routes)}."))

    return [*routes, Route("/v1/{rest:path}", unmatched, methods=list(UNMATCHED_METHODS))]
