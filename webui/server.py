"""One ASGI app on one port: the Gradio UI and its queue, plus plain health routes."""

from __future__ import annotations

import logging

import gradio as gr
from fastapi.responses import JSONResponse
from starlette.routing import Route

from pipeline.engine import Engine

log = logging.getLogger("zimage.webui")


def health_routes(engine: Engine) -> list[Route]:
    async def healthz(_request):
        return JSONResponse({"status": "ok"})

    async def readyz(_request):
        body = {"ready": engine.ready, "attention": engine.attention_backend, "device": str(engine.device)}
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


def serve(blocks: gr.Blocks, engine: Engine, *, host: str, port: int, share: bool, queue_size: int) -> None:
    """Serve until interrupted. Every event goes through the one queue: `api_open=False` closes the REST routes
    that would skip it, and `max_size` turns requests away as busy instead of letting the line grow without end."""
    blocks.queue(max_size=queue_size, default_concurrency_limit=1, api_open=False)
    # Routes passed to the FastAPI constructor come before Gradio's own, so nothing of Gradio's shadows them.
    blocks.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, ssr_mode=False,
        show_error=False, app_kwargs={"routes": health_routes(engine)},
    )
    log.info("ready url=http://%s:%d", host, port)
    blocks.block_thread()
