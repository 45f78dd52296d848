"""Gradio's routes as this service serves them: one table, the classifier that tags each request with its row, and
every reach into Gradio's or FastAPI's private parts.

The table is an allow-list. A request is matched against it the way Starlette matches Gradio's own routes (the same
path templates, compiled by Starlette, on the same percent-decoded path), so every spelling that would reach a
Gradio route reaches its row: `/gradio_api/file%2f<url>` is `/gradio_api/file/<url>` to both. A path that no row
and none of the service's own routes match gets 404 here, so a route a new Gradio adds is closed until a row serves
it (`unlisted_routes` names such routes in the start's log, and a test fails on them).

Read from Gradio 6.31.0 (gradio.routes.App.create_app and mount_gradio_app), FastAPI 0.165.0, Starlette 1.10.0.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gradio.route_utils import FnIndexInferError
from gradio.utils import get_upload_folder
from starlette.routing import BaseRoute, Match, Mount, compile_path

from pipeline.requests import shown
from webui.arrival import stamp_arrival
from webui.asgi_errors import openai_error, send_json

ROUTE_KEY = "zimage.route"  # where the classifier leaves a request's GradioRoute (None: one of the service's own)
# Prefixes of Gradio's routes that the guards tell apart within a row's kind (webui.limits, webui.event_inputs).
HEARTBEAT_PATH = "/gradio_api/heartbeat/"
QUEUE_JOIN_PATH = "/gradio_api/queue/join"
QUEUE_DATA_PATH = "/gradio_api/queue/data"
CALL_PATH = "/gradio_api/call/"
UPLOAD_PATH = "/gradio_api/upload"
CALL_BY_KEYWORD_PATH = "/gradio_api/call/v2/"  # call/ with the inputs by name: the page's "Use via API" shows it
UI_EVENT_PATHS = ("/gradio_api/run/", "/gradio_api/api/")  # the events that skip the queue (api/ is run/'s alias)
# Headers Gradio builds the page's own URLs from (gradio.route_utils.get_request_origin): the page's root in /config
# and in /, which a caching proxy would keep and serve to everyone. The page's URLs come from --public-url, or else
# from the address the request came to (Host, which webui.origin checks on a loopback bind); uvicorn has already
# applied X-Forwarded-For and -Proto from the proxies the operator trusts (--trusted-proxy), to the scope.
URL_HEADERS = frozenset({b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-prefix",
                         b"x-forwarded-for", b"forwarded", b"x-gradio-server"})


class Kind(enum.Enum):
    PAGE = "page"  # built anew for each request (2-4 ms of Python): the page-load budget counts them
    STATIC = "static"  # the page's scripts, styles and icons: files, or a few bytes
    STATUS = "status"  # small answers about the session or the queue
    SMALL_EVENT = "small event"  # a page event that skips the queue: the UI-event budget counts them
    QUEUED_EVENT = "queued event"  # joins the queue: the new-session budget counts those that open a session
    STREAM = "event stream"  # held open for as long as the session or the event lives: the stream pool counts them
    FILE = "file"  # a file Gradio serves: the gallery's images (from the output folder), never an upload
    UPLOAD = "upload"  # the page's image editor sends its picture and brush layers here (webui.editor_uploads)
    CLOSED = "closed"  # 404: nothing of the service needs it (`why`)


@dataclass(frozen=True)
class GradioRoute:
    template: str  # Gradio's own path template, as Starlette compiles it
    methods: frozenset[str]
    kind: Kind
    why: str = ""  # for a closed route: what it would let a client do
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", compile_path(self.template)[0])


def _row(template: str, methods: str, kind: Kind, why: str = "") -> GradioRoute:
    return GradioRoute(template, frozenset(methods.split()), kind, why)


_UNUSED_AUTH = "Gradio's own login: credentials are checked for every route by webui.auth instead"
_UNUSED_MEDIA = "streams media components' output: the UI has none"
_URL_FETCHER = ("fetches any http(s) URL it is given from this server and streams the answer back: an open proxy "
                "(the service's files are all its own)")
_NO_RECORDINGS = "takes audio and video recordings: no part of the UI records"
_UPLOADED = "serves back what clients uploaded: an upload is read once, by its edit, and deleted"
_NO_EDITING = "Gradio's in-browser app editor: not part of a deployed service"

# In Gradio's order: where two rows match a path, the first decides, as Starlette's router does.
ROUTES: tuple[GradioRoute, ...] = (
    _row("/openapi.json", "GET HEAD", Kind.CLOSED, "FastAPI's schema of Gradio's app: /gradio_api/info describes "
                                                   "the API clients use"),
    _row("/login/", "POST", Kind.CLOSED, _UNUSED_AUTH),
    _row("/login", "POST", Kind.CLOSED, _UNUSED_AUTH),
    _row("/logout", "GET", Kind.CLOSED, _UNUSED_AUTH),
    _row("/svelte/{path:path}", "GET", Kind.STATIC),
    _row("/", "GET HEAD", Kind.PAGE),
    _row("/gradio_api/deep_link", "GET", Kind.CLOSED, "writes the session's state to a new file in the temp dir "
                                                      "on every call"),
    _row("/config", "GET", Kind.PAGE),
    _row("/config/", "GET", Kind.PAGE),
    _row("/static/{path:path}", "GET", Kind.STATIC),
    _row("/assets/{path:path}", "GET", Kind.STATIC),
    _row("/favicon.ico", "GET", Kind.STATIC),
    _row("/theme.css", "GET", Kind.STATIC),
    _row("/robots.txt", "GET", Kind.STATIC),
    _row("/pwa_icon/{size}", "GET", Kind.STATIC),
    _row("/pwa_icon", "GET", Kind.STATIC),
    _row("/manifest.json", "GET", Kind.STATIC),
    _row("/monitoring", "GET", Kind.CLOSED, "prints its key to the log on every call"),
    _row("/monitoring/summary", "GET", Kind.CLOSED, "tells anyone the traffic"),
    _row("/monitoring/{key}", "GET", Kind.CLOSED, "the monitoring page"),
    _row("/gradio_api/user/", "GET", Kind.STATUS),
    _row("/gradio_api/user", "GET", Kind.STATUS),
    _row("/gradio_api/login_check/", "GET", Kind.STATUS),
    _row("/gradio_api/login_check", "GET", Kind.STATUS),
    _row("/gradio_api/token/", "GET", Kind.STATUS),
    _row("/gradio_api/token", "GET", Kind.STATUS),
    _row("/gradio_api/app_id/", "GET", Kind.STATUS),
    _row("/gradio_api/app_id", "GET", Kind.STATUS),
    _row("/gradio_api/dev/reload", "GET", Kind.CLOSED, "holds a stream open forever (Gradio's reload mode)"),
    _row("/gradio_api/runs/", "GET", Kind.PAGE),
    _row("/gradio_api/runs", "GET", Kind.PAGE),
    _row("/gradio_api/run-history/connect", "POST", Kind.CLOSED, "Gradio's run history: the gallery keeps the "
                                                                  "service's own"),
    _row("/gradio_api/run-history/buckets", "GET", Kind.CLOSED, "Gradio's run history"),
    _row("/gradio_api/run-history/records", "GET", Kind.CLOSED, "Gradio's run history"),
    _row("/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}", "GET", Kind.CLOSED,
         "Gradio's run history"),
    _row("/gradio_api/info", "GET", Kind.PAGE),
    _row("/gradio_api/info/", "GET", Kind.PAGE),
    _row("/gradio_api/openapi.json", "GET", Kind.PAGE),
    _row("/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}", "GET", Kind.CLOSED,
         "custom components' files (none here); printed kilobytes of its path to the log per request"),
    _row("/gradio_api/proxy={url_path:path}", "GET HEAD", Kind.CLOSED, "fetches URLs of other Gradio apps"),
    _row("/gradio_api/file={path_or_url:path}", "GET HEAD", Kind.FILE),
    _row("/gradio_api/stream/{event_id}", "POST", Kind.CLOSED, _UNUSED_MEDIA),
    _row("/gradio_api/stream/{event_id}/close", "POST", Kind.CLOSED, _UNUSED_MEDIA),
    _row("/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8", "GET", Kind.CLOSED, _UNUSED_MEDIA),
    _row("/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}", "GET", Kind.CLOSED,
         _UNUSED_MEDIA),
    _row("/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file", "GET", Kind.CLOSED, _UNUSED_MEDIA),
    _row("/gradio_api/file/{path:path}", "GET", Kind.CLOSED, "the file route's old spelling, which " + _URL_FETCHER),
    _row("/gradio_api/reset", "POST", Kind.CLOSED, "resets streaming iterators: none here"),
    _row("/gradio_api/reset/", "POST", Kind.CLOSED, "resets streaming iterators: none here"),
    _row("/gradio_api/heartbeat/{session_hash}", "GET", Kind.STREAM),
    _row("/gradio_api/api/{api_name}/", "POST", Kind.SMALL_EVENT),
    _row("/gradio_api/api/{api_name}", "POST", Kind.SMALL_EVENT),
    _row("/gradio_api/run/{api_name}/", "POST", Kind.SMALL_EVENT),
    _row("/gradio_api/run/{api_name}", "POST", Kind.SMALL_EVENT),
    _row("/gradio_api/call/v2/{api_name}/", "POST", Kind.QUEUED_EVENT),
    _row("/gradio_api/call/v2/{api_name}", "POST", Kind.QUEUED_EVENT),
    _row("/gradio_api/call/{api_name}/", "POST", Kind.QUEUED_EVENT),
    _row("/gradio_api/call/{api_name}", "POST", Kind.QUEUED_EVENT),
    _row("/gradio_api/queue/join", "POST", Kind.QUEUED_EVENT),
    _row("/gradio_api/cancel", "POST", Kind.CLOSED, "ends a started event in Gradio's queue while the engine goes on "
                                                    "with its job: cancelled requests got past --queue-size"),
    _row("/gradio_api/call/{api_name}/{event_id}", "GET", Kind.STREAM),
    _row("/gradio_api/call/v2/{api_name}/{event_id}", "GET", Kind.STREAM),
    _row("/gradio_api/queue/data", "GET", Kind.STREAM),
    _row("/gradio_api/component_server/", "POST", Kind.CLOSED, "custom components' server functions (none here): "
                                                               "kept a session under any name a body gave"),
    _row("/gradio_api/component_server", "POST", Kind.CLOSED, "custom components' server functions (none here)"),
    _row("/gradio_api/queue/status", "GET", Kind.STATUS),
    _row("/gradio_api/upload_progress", "GET", Kind.CLOSED, "kept every upload id it was asked about, in memory, "
                                                            "for good"),
    _row("/gradio_api/upload", "POST", Kind.UPLOAD),
    _row("/gradio_api/startup-events", "GET", Kind.CLOSED, "starts the queue for Gradio's launch(); the service's "
                                                           "own server starts it at its start"),
    _row("/gradio_api/theme.css", "GET", Kind.STATIC),
    _row("/gradio_api/process_recording", "POST", Kind.CLOSED, _NO_RECORDINGS),
    _row("/gradio_api/vibe-edit", "POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/vibe-edit/", "POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/undo-vibe-edit", "POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/undo-vibe-edit/", "POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/vibe-code", "GET POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/vibe-code/", "GET POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/vibe-starter-queries", "POST", Kind.CLOSED, _NO_EDITING),
    _row("/gradio_api/vibe-starter-queries/", "POST", Kind.CLOSED, _NO_EDITING),
)

# A scheme at the start of a file route's argument: Gradio fetches http(s) URLs there (and reads the rest as a path
# under its temp dir); any scheme at all is refused, whatever its case, so no spelling reaches the fetcher.
_URL_LIKE = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*:|[/\\]{2})")


def classify(path: str, method: str) -> tuple[GradioRoute | None, dict[str, str]]:
    """The row that a request for `path` with `method` reaches in Gradio's router, and its path parameters; None
    when no row matches. As Starlette does, a row whose template matches but not its method decides only if no
    later row matches both (Gradio then answers 405)."""
    partial = None
    for route in ROUTES:
        match = route.pattern.match(path)
        if match is None:
            continue
        if method in route.methods:
            return route, match.groupdict()
        partial = partial or (route, match.groupdict())
    return partial if partial is not None else (None, {})


def upload_folder() -> Path:
    """Where Gradio's upload route writes files: its temp dir (GRADIO_TEMP_DIR, which app.py makes private)."""
    return Path(get_upload_folder())


def refusal(route: GradioRoute | None, parameters: dict[str, str], uploads: Path | None = None) -> str | None:
    """Why a request that reached `route` (None: no row) is not served; None when it is. `uploads`: the folder of
    uploads, which the file route never serves from."""
    if route is None:
        return "no route of this service"
    if route.kind is Kind.CLOSED:
        return route.why
    if route.kind is Kind.FILE:
        asked = parameters.get("path_or_url", "")
        if _URL_LIKE.match(asked):
            return _URL_FETCHER
        # As Gradio reads the argument: a path, relative ones from the working directory, links followed.
        if uploads is not None and "\x00" not in asked and Path(os.path.realpath(asked)).is_relative_to(
                os.path.realpath(uploads)):
            return _UPLOADED
    return None


class ClassifyGradioRoutes:
    """ASGI middleware that tags each request once: its arrival time (webui.arrival), and, when none of the
    service's own routes (`own_routes`) takes it, its row of ROUTES (ROUTE_KEY), which the middleware inside reads;
    a closed row, a file route given a URL or a path in `uploads`, or a path no row matches gets 404 (see the
    module's docstring). The headers of URL_HEADERS are taken out of every request."""

    def __init__(self, app, own_routes: list[BaseRoute], uploads: Path | None = None):
        self.app, self.own_routes, self.uploads = app, own_routes, uploads

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stamp_arrival(scope)
        if any(name in URL_HEADERS for name, _ in scope["headers"]):
            scope["headers"] = [(name, value) for name, value in scope["headers"] if name not in URL_HEADERS]
        if any(route.matches(scope)[0] is not Match.NONE for route in self.own_routes):
            scope[ROUTE_KEY] = None
            await self.app(scope, receive, send)
            return
        route, parameters = classify(scope["path"], scope["method"])
        if refusal(route, parameters, self.uploads) is not None:
            await send_json(send, 404, openai_error(f"Not found: {shown(scope['path'])} is no route of this "
                                                    f"service.", None, status=404))
            return
        scope[ROUTE_KEY] = route
        await self.app(scope, receive, send)


def gradio_route_templates(gradio_app) -> list[tuple[str, frozenset[str]]]:
    """Every route Gradio's app serves, as (template, methods), in its order. FastAPI 0.165 keeps routers included
    with include_router as `_IncludedRouter` entries whose routes are in `original_router` (private to FastAPI)."""
    found = []

    def walk(routes) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:
                walk(included.routes)
            elif hasattr(route, "path"):
                found.append((route.path, frozenset(getattr(route, "methods", None) or ())))

    walk(gradio_app.routes)
    return found


def mounted_gradio_app(app):
    """The Gradio app that gr.mount_gradio_app mounted in `app`."""
    return next(route.app for route in app.routes if isinstance(route, Mount))


def unlisted_routes(gradio_app) -> list[str]:
    """Gradio's routes that no row of ROUTES names (closed until one does): what a Gradio upgrade added."""
    listed = {(route.template, method) for route in ROUTES for method in route.methods}
    return sorted({f"{' '.join(sorted(methods))} {template}" for template, methods in gradio_route_templates(gradio_app)
                   if any((template, method) not in listed for method in methods)})


# What Gradio's call/NAME raises (gradio.route_utils, Gradio 6.31) for a NAME that is no endpoint: the caller's
# mistake, answered 404 by webui.asgi_errors.AnswerUnhandledErrors.
UNKNOWN_ENDPOINT = FnIndexInferError


async def _raise_to_the_service(_request, error: Exception):
    raise error


# For gr.mount_gradio_app: Gradio's app, like every Starlette app, answers an exception that escapes a route with a
# bare "Internal Server Error" before passing it on, and the service's middleware (outside the mounted app) could
# then only log an answer broken off. A handler that raises skips that answer, and webui.asgi_errors answers: a
# JSON 500 with an incident id, or 404 for an unknown API name.
GRADIO_APP_KWARGS = {"exception_handlers": {Exception: _raise_to_the_service}}


def keep_more_sessions(blocks, sessions: int) -> None:
    """Gradio's cache of sessions' undelivered messages holds 2,000 and has no setting (webui.limits.SESSIONS_KEPT
    says why it must hold more): `Queue.pending_messages_per_session`, an LRUCache, in Gradio 6.31."""
    blocks._queue.pending_messages_per_session.max_size = sessions


def forget_upload(blocks, name: str) -> None:
    """Gradio keeps the path of every upload (`Blocks.upload_file_set`, in Gradio 6.31) for good unless its own
    cache sweep deletes the file: an upload the service deleted is taken out, so the set does not grow forever."""
    blocks.upload_file_set.discard(name)


def page_events(blocks) -> dict[int, object]:
    """fn_index → Gradio's BlockFunction for each of the page's events (its inputs, api_name, whether it is
    queued): `Blocks.fns`, which has no public accessor, in Gradio 6.31."""
    return dict(blocks.fns)


def example_count(dataset) -> int:
    """How many examples a gr.Dataset holds: `Dataset.raw_samples`, in Gradio 6.31."""
    return len(dataset.raw_samples)
