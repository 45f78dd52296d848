"""One ASGI app on one port: the Gradio UI and its queue, plus plain health routes; and an orderly shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from urllib.parse import urlsplit

import gradio as gr
import torch
from fastapi.responses import JSONResponse, Response
from starlette.middleware import Middleware
from starlette.routing import Route

from config.log_lines import seconds_since_process_start
from pipeline.engine import Engine
from pipeline.messages import first_line
from pipeline.metrics import CONTENT_TYPE, ServiceMetrics
from webui.arrival import StampArrival
from webui.asgi_errors import AnswerUnhandledErrors
from webui.auth import LinkSigner, RequireCredentials
from webui.connections import guard_connections
from webui.event_inputs import CheckEventInputs, event_inputs
from webui.file_ranges import RangesByStarlette
from webui.limits import PAGE_LOADS, SESSIONS_KEPT, UI_EVENTS, GuardGradioCalls, LimitBodySize, LimitRate
from webui.openai_api import openai_routes
from webui.origin import RefuseCrossSite, is_loopback_name
from webui.resolutions import offered_sizes

log = logging.getLogger("zimage.webui")

SIGNAL_POLL_S = 0.5
# Where a request joins Gradio's queue: the UI's (queue/join) and the REST API's (call/<api name>).
QUEUE_JOIN_PATHS = ("/gradio_api/queue/join", "/gradio_api/call/")
RESULT_DELIVERY_S = 1.0  # after the last image is saved, time for it to reach the browser before closing
CLOSE_S = 1  # uvicorn's graceful-shutdown limit: open event streams (a page's queue) are cut after this
EXIT_S = 1  # what the process needs after closing the server: child processes, the last log lines


def health_routes(engine: Engine) -> list[Route]:
    async def healthz(_request):
        return JSONResponse({"status": "ok"})

    async def readyz(_request):
        state = engine.state()
        ready = bool(state["ready"] and state["healthy"])
        body = {key: state[key] for key in ("ready", "healthy", "busy", "served", "attention", "compiled", "serving",
                                            "text_encoder", "device", "replicas_ready", "replicas_total")
                if key in state}
        if engine.device.type == "cuda":
            try:
                free, total = torch.cuda.mem_get_info(engine.device)
                body.update(gpu_free_mib=free // 2**20, gpu_total_mib=total // 2**20)
            except RuntimeError as error:  # a poisoned context fails every call: not ready, and say why
                ready = False
                body.update(ready=False, gpu_error=first_line(error))
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


class CountQueueRefusals:
    """ASGI middleware: a request Gradio's queue turns away (full, or stopping: 503 when it tries to join) never
    reaches the engine, which counts every other outcome; count it here as "busy", so zimage_requests_total shows
    the load that was refused."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(QUEUE_JOIN_PATHS):
            await self.app(scope, receive, send)
            return

        async def noting_refusals(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                self.metrics.request_finished("busy")
            await send(message)

        await self.app(scope, receive, noting_refusals)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def metrics_route(metrics: ServiceMetrics, engine: Engine, blocks: gr.Blocks) -> Route:
    """/metrics in Prometheus' text format: the engine's counters and histograms, and gauges read at each scrape."""
    metrics.gauge("zimage_queue_depth", "Requests waiting in the queue (what Gradio's /queue/status reports)",
                  lambda: blocks._queue.get_status().queue_size)
    metrics.gauge("zimage_in_flight", "Requests being generated now (one per engine at most: one per replica with "
                  "--replicas)", lambda: engine.running_jobs)
    metrics.gauge("zimage_model_loaded", "1 once the model is loaded and warmed up, and no fatal error since",
                  lambda: int(engine.ready and engine.healthy))
    if engine.device.type == "cuda":
        metrics.gauge("zimage_gpu_memory_allocated_bytes", "GPU memory held by tensors",
                      lambda: torch.cuda.memory_allocated(engine.device))
        metrics.gauge("zimage_gpu_memory_reserved_bytes", "GPU memory held by PyTorch's caching allocator",
                      lambda: torch.cuda.memory_reserved(engine.device))

    async def scrape(_request):
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    return Route("/metrics", scrape)


def closed_routes() -> list[Route]:
    """Gradio routes this service has no use for, answered 404 before Gradio's own see them:
    - a deep link writes the session's state to a new file in the temp dir on every call;
    - the monitoring page prints its key to the log on every call, and its summary tells anyone the traffic;
    - dev/reload holds a stream open forever (it serves Gradio's reload mode);
    - component_server (custom components' server functions: none here) keeps a session under whatever name a form
      body gives it, and custom_component prints the id in its path, kilobytes a request, to the log;
    - a file route given an http(s) URL fetches that URL from this server and streams it back (any public address:
      an open proxy; this service's files are all its own);
    - upload stores a part with a file name and no bytes (no part of the UI takes a file), and upload_progress keeps
      every upload id it is asked about, in memory, for good, and holds each such request open for seconds;
    - cancel ends a started event in Gradio's queue while the engine goes on with its job, so a client cancelling
      its own requests as they start gets past --queue-size (45 such piled 74 s of work before the next request)."""

    async def closed(_request):
        return JSONResponse({"error": "Not found: this service serves no deep links, monitoring, reload, custom "
                                      "components, uploads, cancelling or other sites' files."}, status_code=404)

    return [Route(path, closed, methods=["GET", "HEAD", "POST"])
            for path in ("/gradio_api/deep_link", "/gradio_api/dev/reload", "/gradio_api/component_server",
                         "/gradio_api/component_server/", "/gradio_api/custom_component/{rest:path}",
                         "/monitoring", "/monitoring/{rest:path}",
                         "/gradio_api/file=http://{rest:path}", "/gradio_api/file=https://{rest:path}",
                         "/gradio_api/upload", "/gradio_api/upload_progress", "/gradio_api/cancel")]


def loopback_url(host: str, port: int, tls: bool = False) -> str:
    """Where this server answers from inside the same machine."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def serve(blocks: gr.Blocks, engine: Engine, *, host: str, port: int, share: bool, queue_size: int,
          shutdown_grace_s: float, metrics: ServiceMetrics, credentials: dict[str, str], max_connections: int,
          header_timeout_s: float, send_timeout_s: float, ssl_certfile: str = "", ssl_keyfile: str = "",
          public_url: str = "", compile_delay_s: float = 0.0) -> int:
    """Serve until SIGTERM or SIGINT, then shut down in order; returns the exit code (0: asked to stop).

    Every event goes through the one queue: `api_open=False` closes the REST routes that would skip it, and
    `max_size` turns requests away as busy instead of letting the line grow without end. The OpenAI-style routes
    join that same queue. With `credentials`, every route but the health checks needs them.
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

    blocks.queue(max_size=queue_size, default_concurrency_limit=1, api_open=False)
    # Gradio's own cache of sessions' undelivered messages holds 2,000 (see webui.limits.SESSIONS_KEPT); it has no
    # setting, and its size is the one attribute changed here.
    blocks._queue.pending_messages_per_session.max_size = SESSIONS_KEPT
    deliveries = Deliveries()
    local_url = loopback_url(host, port, tls=bool(ssl_certfile))
    links = LinkSigner() if credentials else None  # image links that open without the credentials
    routes = [*health_routes(engine), metrics_route(metrics, engine, blocks), *closed_routes(),
              *openai_routes(engine.output_dir, local_url, public_url or local_url, started_at=time.time(),
                             deliveries=deliveries, metrics=metrics, links=links)]
    # Bound to loopback, only loopback names and --public-url's host are this server's (see webui.origin).
    own_hosts = (frozenset(filter(None, [urlsplit(public_url).hostname]))
                 if not share and is_loopback_name(host.lower()) else None)
    # Another site's requests are refused before the budgets count them: they cannot spend them.
    middleware = [Middleware(AnswerUnhandledErrors),
                  Middleware(RefuseCrossSite, own_hosts=own_hosts,
                             budgeted=lambda path: UI_EVENTS.counts(path) or PAGE_LOADS.counts(path)),
                  Middleware(LimitRate, rated=UI_EVENTS), Middleware(LimitRate, rated=PAGE_LOADS),
                  Middleware(StampArrival), Middleware(LimitBodySize),
                  Middleware(GuardGradioCalls, streams=max(1, max_connections // 2), events=frozenset(blocks.fns),
                             small_events={index: fn.api_name for index, fn in blocks.fns.items() if not fn.queue},
                             api_names=frozenset(fn.api_name for fn in blocks.fns.values() if fn.api_name)),
                  Middleware(CheckEventInputs, **event_inputs(blocks)),
                  Middleware(CountQueueRefusals, metrics=metrics), Middleware(RangesByStarlette)]
    if credentials:
        middleware.insert(1, Middleware(RequireCredentials, credentials=credentials, links=links))
    # Routes passed to the FastAPI constructor come before Gradio's own, so nothing of Gradio's shadows them.
    # show_error: Gradio's own input errors ("didn't receive enough input values") reach the caller; the UI's
    # handler turns everything else into a message of its own, so no internal detail leaks through it.
    blocks.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, ssr_mode=False,
        show_error=True, app_kwargs={"routes": routes, "middleware": middleware},
        # No component takes a file: past the closed upload route (closed_routes), a limit of 0 bytes makes any
        # other way Gradio takes a file refuse it instead of storing what anyone sends in its temp dir.
        max_file_size=0,
        # ssl_verify=False: Gradio checks its own URL once at launch, and a certificate names the public host, not
        # the loopback address it checks.
        ssl_certfile=ssl_certfile or None, ssl_keyfile=ssl_keyfile or None, ssl_verify=False,
    )
    guard_connections(blocks.server, max_connections=max_connections, request_timeout_s=header_timeout_s,
                      send_timeout_s=send_timeout_s)
    # uvicorn gave its loggers handlers of their own at launch (its default logging config), which print to stderr
    # line by line: a traceback became dozens of records. Through the service's handler, one record, marked.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # How long this start took, from the process's birth (imports included), for an operator after a restart.
    log.info("ready url=%s://%s:%d seconds_since_process_start=%.2f", "https" if ssl_certfile else "http", host, port,
             seconds_since_process_start())
    engine.start_background_work(delay_s=compile_delay_s)
    # The UI's sizes, the default (1024²) first: what most requests will need.
    engine.build_attention_plans(offered_sizes(engine.limits.max_w, engine.limits.max_h))
    # Short waits, not one endless one: Linux may hand SIGTERM to any thread, and then a main thread asleep in an
    # untimed wait never wakes to run the Python handler. Each timeout returns to the interpreter, which runs it.
    while not stop.wait(timeout=SIGNAL_POLL_S):
        pass

    # Stop accepting → let the running job finish and reach its client, all within the grace period → close the
    # server (open event streams cut after CLOSE_S) → exit.
    deadline = time.monotonic() + shutdown_grace_s - CLOSE_S - EXIT_S
    in_flight = engine.in_flight
    log.info("shutdown requested signal=%s in_flight=%s grace_s=%s", received[0], in_flight or "none",
             shutdown_grace_s)
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
    blocks.server.config.timeout_graceful_shutdown = CLOSE_S  # read by uvicorn when it shuts down
    blocks.close(verbose=False)
    log.info("shutdown done job=%s exit=0", outcome)
    return 0
