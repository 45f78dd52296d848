"""The service's own app and server on one port: its health, metrics and OpenAI routes and its middleware, with
Gradio's UI and queue mounted inside (gr.mount_gradio_app), under a uvicorn server configured whole before it
starts; and an orderly shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.middleware import Middleware
from starlette.routing import Route

from config.log_lines import seconds_since_process_start
from pipeline.serving import ServingEngine
from pipeline.messages import first_line
from pipeline.metrics import CONTENT_TYPE, ServiceMetrics
from webui.admission import AdmissionLine
from webui.asgi_errors import AnswerUnhandledErrors
from webui.auth import LOOPBACK, LinkSigner, RequireCredentials
from webui.connections import guarded_protocol
from webui.editor_uploads import UploadFolder
from webui.event_inputs import PageEvents
from webui.gradio_surface import (
    GRADIO_APP_KWARGS,
    UNKNOWN_ENDPOINT,
    UPLOAD_PATH,
    ClassifyGradioRoutes,
    forget_upload,
    keep_more_sessions,
    mounted_gradio_app,
    unlisted_routes,
)
from webui.limits import (
    MAX_BODY_BYTES,
    PAGE_LOADS,
    SESSIONS_KEPT,
    UI_EVENTS,
    UPLOADS,
    GuardGradioCalls,
    LimitBodySize,
)
from webui.openai_api import UPLOAD_ROUTES, openai_routes
from webui.origin import RefuseCrossSite, is_loopback_name
from webui.resolutions import offered_sizes
from webui.streams import StreamPool
from webui.ui import OPTIONAL_INPUTS

log = logging.getLogger("zimage.webui")

SIGNAL_POLL_S = 0.5
RESULT_DELIVERY_S = 1.0  # after the last image is saved, time for it to reach the browser before closing
CLOSE_S = 1  # uvicorn's graceful-shutdown limit: open event streams (a page's queue) are cut after this
EXIT_S = 1  # what the process needs after closing the server: child processes, the last log lines


def health_routes(engine: ServingEngine, streams: StreamPool) -> list[Route]:
    async def healthz(_request):
        return JSONResponse({"status": "ok"})

    async def readyz(_request):
        status = engine.status()
        ready = status.ready and status.healthy
        body = status.for_probe()
        try:
            if (memory := engine.gpu_memory()) is not None:
                body.update(gpu_free_mib=memory.free // 2**20, gpu_total_mib=memory.total // 2**20)
        except RuntimeError as error:  # a poisoned context fails every call: not ready, and say why
            ready = False
            body.update(ready=False, gpu_error=first_line(error))
        # Ready, still, with every stream delivering: a new page or request waits for a place, as for the GPU.
        body["event_streams"] = streams.counts()
        # Every request would be refused while images cannot be saved; the field tells the operator what to fix.
        if (output_dir_error := engine.output_dir_problem()) is not None:
            ready = False
            body.update(ready=False, output_dir_error=output_dir_error)
        return JSONResponse(body, status_code=200 if ready else 503)

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


class Deliveries:
    """Responses that carry images and are still being answered (the OpenAI route's): a shutdown waits for them, so
    an image the engine finished reaches its client instead of a 500 from a closed queue."""

    def __init__(self):
        self._active = 0
        self._done = threading.Condition()

    def begin(self) -> None:
        with self._done:
            self._active += 1

    def end(self) -> None:
        with self._done:
            self._active -= 1
            self._done.notify_all()

    def wait_done(self, timeout: float) -> bool:
        with self._done:
            return self._done.wait_for(lambda: self._active == 0, timeout=max(0.0, timeout))


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def metrics_route(metrics: ServiceMetrics, engine: ServingEngine, line: AdmissionLine, streams: StreamPool) -> Route:
    """/metrics in Prometheus' text format: the engine's counters and histograms, and gauges read at each scrape."""
    metrics.gauge("zimage_event_streams_open", "Event streams open (heartbeats, pages' and API calls' results)",
                  lambda: len(streams.open))
    metrics.gauge("zimage_event_streams_delivering", "Event streams with a result still to deliver; new streams are "
                  "refused once every open one is", lambda: streams.counts()["delivering"])
    metrics.counter_read("zimage_event_streams_ended", "Idle event streams ended to make room for new ones",
                         lambda: streams.evicted)
    metrics.counter_read("zimage_event_streams_refused", "Event streams and joins refused: every place was "
                         "delivering, or a client address held its share", lambda: streams.refused)
    metrics.gauge("zimage_queue_depth", "Requests waiting in the admission line for the GPU", lambda: line.waiting)
    metrics.gauge("zimage_in_flight", "Requests being generated now (one per engine at most: one per replica with "
                  "--replicas)", lambda: engine.running_jobs)
    metrics.gauge("zimage_model_loaded", "1 once the model is loaded and warmed up, and no fatal error since",
                  lambda: int(engine.ready and engine.healthy))
    if engine.gpu_memory() is not None:
        # NaN while an engine process restarts (pipeline.engine_process): its GPU reports from the new one.
        metrics.gauge("zimage_gpu_memory_allocated_bytes", "GPU memory held by tensors",
                      lambda: _gpu_bytes(engine, "allocated"))
        metrics.gauge("zimage_gpu_memory_reserved_bytes", "GPU memory held by PyTorch's caching allocator",
                      lambda: _gpu_bytes(engine, "reserved"))

    async def scrape(_request):
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    return Route("/metrics", scrape)


def _gpu_bytes(engine: ServingEngine, which: str) -> float:
    memory = engine.gpu_memory()
    return float("nan") if memory is None else getattr(memory, which)


# The service's middleware, outermost first. Each one's place, and why:
MIDDLEWARE_ORDER = (
    AnswerUnhandledErrors,  # first: whatever fails inside, the client gets JSON and the log one line
    RequireCredentials,  # (with --auth) before anything spends work on a request
    ClassifyGradioRoutes,  # tags each request with its arrival and its row of Gradio's routes, which all below read
    RefuseCrossSite,  # before the budgets (GuardGradioCalls): another site's page cannot spend them
    LimitBodySize,  # before GuardGradioCalls reads a body whole
    GuardGradioCalls,  # budgets, sessions, events' inputs, event streams, joins, the file route's ranges
)


def service_middleware(blocks: gr.Blocks, routes: list[Route], streams: StreamPool, *, credentials: dict[str, str],
                       links: LinkSigner | None, own_hosts: frozenset[str] | None,
                       larger_bodies: list[tuple[Route, int]] = (),
                       uploads: UploadFolder | None = None) -> list[Middleware]:
    """The middleware, outermost first, in MIDDLEWARE_ORDER (RequireCredentials only with `credentials`).
    `larger_bodies`: routes whose bodies may be larger than MAX_BODY_BYTES, each with its own limit. `uploads`: the
    folder of the image editor's uploads, never served back and kept within its room."""
    budgets = (UI_EVENTS, PAGE_LOADS, UPLOADS)
    upload_guards = {}
    if uploads is not None:
        def room() -> str | None:
            return uploads.room_problem(lambda name: forget_upload(blocks, name))

        upload_guards = {"upload_room": room, "upload_problem": uploads.body_problem}
    return [
        Middleware(AnswerUnhandledErrors, unknown_endpoint=UNKNOWN_ENDPOINT),
        *([Middleware(RequireCredentials, credentials=credentials, links=links)] if credentials else []),
        Middleware(ClassifyGradioRoutes, own_routes=routes, uploads=uploads.folder if uploads else None),
        Middleware(RefuseCrossSite, own_hosts=own_hosts,
                   budgeted=lambda scope: any(rated.counts(scope) for rated in budgets)),
        Middleware(LimitBodySize, larger=larger_bodies),
        Middleware(GuardGradioCalls, streams=streams, page=PageEvents.of(blocks, OPTIONAL_INPUTS), budgets=budgets,
                   **upload_guards)]


async def _never_called(_request):
    """The endpoint of a Route that only matches paths (LimitBodySize's): Gradio's route answers them."""
    raise NotImplementedError


def loopback_url(host: str, port: int, tls: bool = False) -> str:
    """Where this server answers from inside the same machine."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def build_app(blocks: gr.Blocks, routes: list[Route], middleware: list[Middleware], root_path: str,
              max_file_size: int = 0) -> FastAPI:
    """The service's app: its own routes, then Gradio's UI mounted at the root, all inside the service's middleware
    (outermost first). `root_path`: where the page's own URLs point; "" for the address each request came to.
    `max_file_size`: the largest file Gradio's upload route takes (0: none)."""
    app = FastAPI(routes=routes, middleware=middleware, openapi_url=None, docs_url=None, redoc_url=None)
    # show_error: Gradio's own input errors ("didn't receive enough input values") reach the caller; the UI's
    # handler turns everything else into a message of its own, so no internal detail leaks through it.
    # run_history off: the gallery keeps the service's own, per browser.
    return gr.mount_gradio_app(app, blocks, path="/", show_error=True, max_file_size=max_file_size, ssr_mode=False,
                               run_history=False, footer_links=["api", "gradio", "settings"],
                               root_path=root_path or None, app_kwargs=GRADIO_APP_KWARGS)


def uvicorn_config(app: FastAPI, *, host: str, port: int, max_connections: int, header_timeout_s: float,
                   send_timeout_s: float, ssl_certfile: str, ssl_keyfile: str, trusted_proxies: str) -> uvicorn.Config:
    """Every setting of the server, given here, before it starts."""
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on",
        http=guarded_protocol(max_connections=max_connections, request_timeout_s=header_timeout_s,
                              send_timeout_s=send_timeout_s),
        limit_concurrency=max_connections + 1, ws="none",
        ssl_certfile=ssl_certfile or None, ssl_keyfile=ssl_keyfile or None,
        # X-Forwarded-For and -Proto are read only from the proxies the operator names: from anyone else they
        # would choose the address failed logins count against, and what the log says.
        proxy_headers=bool(trusted_proxies), forwarded_allow_ips=trusted_proxies or None,
        # uvicorn's records go to the root logger's one handler, the service's (app.configure_logging); one line
        # per request is not logged (the engine logs each job).
        log_config={"version": 1, "disable_existing_loggers": False,
                    "loggers": {"uvicorn": {"level": "WARNING", "propagate": True}}},
        access_log=False, server_header=False,
        timeout_graceful_shutdown=CLOSE_S,
    )


def serve(blocks: gr.Blocks, engine: ServingEngine, line: AdmissionLine, *, host: str, port: int,
          shutdown_grace_s: float, metrics: ServiceMetrics, credentials: dict[str, str], max_connections: int,
          header_timeout_s: float, send_timeout_s: float, ssl_certfile: str = "", ssl_keyfile: str = "",
          public_url: str = "", trusted_proxies: str = "", compile_delay_s: float = 0.0,
          recycle: Callable[[str], bool] | None = None, uploads: UploadFolder) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order; returns the exit code (0: asked to stop).

    `recycle(reason)`: replaces the engine's process, to give its GPU memory back; SIGUSR2 (the watchdog's GPU-memory
    watermark) asks for it, and it runs once no job waits or runs.

    Every image request waits in `line`, the UI's events (through Gradio's queue, which hands them on at once), API
    calls and the OpenAI route alike; `api_open=False` closes the REST routes that would skip Gradio's queue. With
    `credentials`, every route but the health checks needs them. `uploads`: where the page's image editor's
    files go, and the size limits of every upload, the OpenAI route's too.
    """
    stop = threading.Event()
    received: list[str] = []

    # Signals only set a flag; the main thread does the work. A second signal means "now".
    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("shutdown forced signal=%s in_flight=%s", name, engine.in_flight)
            _flush_logs()
            os._exit(1)
        received.append(name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    recycle_asked = threading.Event()
    if recycle is not None:
        signal.signal(signal.SIGUSR2, lambda _signum, _frame: recycle_asked.set())

    blocks.queue(max_size=line.capacity, default_concurrency_limit=1, api_open=False)
    keep_more_sessions(blocks, SESSIONS_KEPT)
    deliveries = Deliveries()
    local_url = loopback_url(host, port, tls=bool(ssl_certfile))
    links = LinkSigner() if credentials else None  # image links that open without the credentials
    # Half the connections for streams, the rest for everything else (health checks among them).
    streams = StreamPool(limit=max(1, max_connections // 2), per_client=max(8, max_connections // 16),
                         loopback=LOOPBACK)
    routes = [*health_routes(engine, streams), metrics_route(metrics, engine, line, streams),
              *openai_routes(engine, line, public_url or local_url, started_at=time.time(),
                             deliveries=deliveries, metrics=metrics, links=links, max_upload_bytes=uploads.max_bytes,
                             max_upload_pixels=uploads.max_pixels)]
    # Bound to loopback, only loopback names and --public-url's host are this server's (see webui.origin).
    own_hosts = (frozenset(filter(None, [urlsplit(public_url).hostname])) if is_loopback_name(host.lower()) else None)
    # An edit's body holds its picture and its mask, each up to the upload limit, beside its text fields; the page's
    # image editor sends one file a request.
    larger = [*((route, 2 * uploads.max_bytes + MAX_BODY_BYTES) for route in routes if route.path in UPLOAD_ROUTES),
              (Route(UPLOAD_PATH, _never_called, methods=["POST"]), uploads.max_bytes + MAX_BODY_BYTES)]
    middleware = service_middleware(blocks, routes, streams, credentials=credentials, links=links,
                                    own_hosts=own_hosts, larger_bodies=larger, uploads=uploads)
    app = build_app(blocks, routes, middleware, root_path=public_url, max_file_size=uploads.max_bytes)
    if unlisted := unlisted_routes(mounted_gradio_app(app)):
        log.warning("gradio serves routes webui.gradio_surface does not list; they are closed (404) until it does: "
                    "%s", ", ".join(unlisted))
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, max_connections=max_connections,
                                           header_timeout_s=header_timeout_s, send_timeout_s=send_timeout_s,
                                           ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                                           trusted_proxies=trusted_proxies))
    # Its own thread: the main thread keeps the signals (uvicorn installs none off the main thread).
    serving = threading.Thread(target=server.run, name="http", daemon=True)
    serving.start()
    while not server.started:
        if not serving.is_alive():  # uvicorn logged why (the port taken since the check at start, say)
            log.error("cannot start: the HTTP server did not start on %s:%d", host, port)
            return 1
        time.sleep(0.01)
    # How long this start took, from the process's birth (imports included), for an operator after a restart.
    log.info("ready url=%s://%s:%d seconds_since_process_start=%.2f", "https" if ssl_certfile else "http", host, port,
             seconds_since_process_start())
    engine.start_background_work(delay_s=compile_delay_s)
    # The UI's sizes, the default (1024²) first: what most requests will need.
    engine.build_attention_plans(offered_sizes(engine.limits.max_w, engine.limits.max_h))
    # Short waits, not one endless one: Linux may hand SIGTERM to any thread, and then a main thread asleep in an
    # untimed wait never wakes to run the Python handler. Each timeout returns to the interpreter, which runs it.
    while not stop.wait(timeout=SIGNAL_POLL_S):
        if recycle_asked.is_set() and line.waiting == 0 and engine.running_jobs == 0 and \
                recycle("asked by SIGUSR2 (the GPU-memory watermark)"):
            recycle_asked.clear()

    # Stop accepting → let the running job finish and reach its client, all within the grace period → close the
    # server (open event streams cut after CLOSE_S) → exit.
    deadline = time.monotonic() + shutdown_grace_s - CLOSE_S - EXIT_S
    in_flight = engine.in_flight
    log.info("shutdown requested signal=%s in_flight=%s grace_s=%s", received[0], in_flight or "none",
             shutdown_grace_s)
    line.stop_accepting()
    engine.stop_accepting()
    if engine.wait_idle(timeout=deadline - time.monotonic()):
        delivered = deliveries.wait_done(timeout=deadline - time.monotonic())
        if in_flight:
            # A page or gradio_client reads its result from the queue's event stream: give it a moment.
            time.sleep(max(0.0, min(RESULT_DELIVERY_S, deadline - time.monotonic())))
        outcome = f"finished id={in_flight}" if in_flight else "none"
        if not delivered:
            outcome += " (an API response was still being sent at the deadline)"
    else:
        outcome = (f"abandoned id={engine.in_flight} (still running at the end of the {shutdown_grace_s} s grace; "
                   f"not returned)")
    blocks.close(verbose=False)  # Gradio's queue, and its heartbeat streams
    server.should_exit = True
    serving.join(timeout=CLOSE_S + EXIT_S)
    log.info("shutdown done job=%s exit=0", outcome)
    return 0
