"""The Gradio Blocks UI. Presentation only: it turns form values into a GenerationRequest and shows the result."""

from __future__ import annotations

import logging
from dataclasses import asdict

import gradio as gr

from pipeline.engine import Engine, GenerationResult
from pipeline.memory import GIB
from pipeline.requests import (
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    MAX_SHIFT,
    MAX_STEPS,
    MIN_SHIFT,
    GenerationRequest,
    RequestError,
    batch_seeds,
    shown,
)
from webui.errors import reported_to_the_caller
from webui.owners import BROWSER_ID, BROWSER_STORAGE_KEY, BROWSER_STORAGE_SECRET, new_browser_id, owner_of
from webui.resolutions import left_out, offered, parse_resolution
from webui.server import ARRIVAL_KEY

log = logging.getLogger("zimage.webui")

HISTORY_SIZE = 12  # the owner's images from disk shown when a page opens, so a restart loses no one's recent work
SESSION_HISTORY_LIMIT = 48  # the gallery goes back to the browser whole after every image: keep it bounded
API_NAME = "generate"  # the queue endpoint: gradio_client.Client(url).predict(..., api_name="/generate")
IMAGES_API_NAME = "images"  # n images for the OpenAI-style route; through the same queue
GPU_QUEUE = "gpu"  # one concurrency group: every event that touches the engine waits in the same line

DEMO_BANNER = (
    "⚠️ **DEMO MODEL** — tiny random weights, built for testing the service. Its images are noise, "
    "not Z-Image-Turbo output. Start without `--demo` and with `--model-dir` to serve the real model."
)


def _caption(parameters: dict[str, object]) -> str:
    return f"seed {parameters['seed']} · {parameters['width']}×{parameters['height']} · {parameters['steps']} steps"


def _timing(result: GenerationResult) -> str:
    t = result.timings
    text = (f"**{t.total_ms / 1000:.2f} s** — text encode {t.encode_ms:.0f} ms · denoise {t.denoise_ms:.0f} ms · "
            f"decode {t.decode_ms:.0f} ms · save {t.save_ms:.0f} ms")
    return "\n\n".join([text, *result.notices])


def _received_at(request: gr.Request | None) -> float | None:
    """When the request that joined Gradio's queue arrived (stamped by webui.server.StampArrival), if known."""
    starlette_request = getattr(request, "request", None)
    return getattr(starlette_request.state, ARRIVAL_KEY, None) if starlette_request is not None else None


def build_ui(engine: Engine, *, demo: bool, model_label: str, max_w: int, max_h: int) -> gr.Blocks:
    guard = engine.memory_guard
    fits = guard.fits if guard is not None else None
    table = offered(max_w, max_h, fits)
    missing = left_out(max_w, max_h, fits) if fits is not None else []
    # Images are served from the output folder as they are: otherwise Gradio hashes and copies every gallery file
    # into its cache on every response, which costs more than the image itself once the gallery has a few dozen.
    gr.set_static_paths([engine.output_dir])
    first_category = next(iter(table))

    def generate(prompt, resolution, seed, random_seed, steps, shift, history, browser_id, request: gr.Request,
                 progress=gr.Progress()):
        with reported_to_the_caller():
            if not isinstance(random_seed, bool):
                raise RequestError(f"random_seed must be true or false (got {shown(random_seed)}).")
            width, height = parse_resolution(resolution)
            generation = GenerationRequest(prompt=prompt, width=width, height=height, steps=steps,
                                           seed=None if random_seed else seed, shift=shift)
            result = engine.generate(generation, received_at=_received_at(request),
                                     progress=lambda step, total: progress((step, total), desc="Denoising"),
                                     owner=owner_of(request, browser_id))
        history = [(str(result.path), _caption(asdict(result.request))), *(history or [])][:SESSION_HISTORY_LIMIT]
        return history, history, result.request.seed, _timing(result), str(result.path)

    def images(prompt: str, size: str, n: int, seed: int | None, steps: int | None, shift: float | None,
               request: gr.Request) -> list[dict]:
        """`n` images of `size` ("WIDTHxHEIGHT") in one turn on the GPU, seeds `seed`, `seed`+1, ... (random when
        seed is None; steps and shift: the defaults when None). Each: the saved PNG's path, its seed and its
        request id. The OpenAI-style route calls this."""
        options = {name: value for name, value in (("steps", steps), ("shift", shift)) if value is not None}
        with reported_to_the_caller():
            seeds = batch_seeds(seed, n)
            width, height = parse_resolution(size)
            made = []
            for next_seed in seeds:
                result = engine.generate(GenerationRequest(prompt=prompt, width=width, height=height, seed=next_seed,
                                                           **options),
                                         received_at=_received_at(request), owner=owner_of(request, None))
                made.append({"path": str(result.path), "seed": result.request.seed, "id": result.request_id})
        return made

    def load_history(stored_browser_id, request: gr.Request):
        """A page opens: its browser's id (a new one on its first visit, kept in localStorage) and the owner's
        newest images."""
        browser_id = stored_browser_id if isinstance(stored_browser_id, str) and BROWSER_ID.fullmatch(
            stored_browser_id) else new_browser_id()
        owned = engine.history(HISTORY_SIZE, owner_of(request, browser_id))
        history = [(str(path), _caption(parameters)) for path, parameters in owned]
        return history, history, browser_id, browser_id

    def switch_category(category):
        choices = table.get(category, [])
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

    with gr.Blocks(title="Z-Image-Turbo") as blocks:
        gr.Markdown(f"# Z-Image-Turbo\nModel: `{model_label}`")
        if demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        history = gr.State([])
        stored_browser_id = gr.BrowserState(None, storage_key=BROWSER_STORAGE_KEY, secret=BROWSER_STORAGE_SECRET)
        browser_id = gr.State(None)  # the page's copy, for generate: a State is no input of the API
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=4, elem_id="prompt",
                                    placeholder="Describe the image in English or Chinese — 例如：雪地里戴红围巾的橘猫")
                with gr.Row():
                    category = gr.Dropdown(list(table), value=first_category, label="Resolution category")
                    resolution = gr.Dropdown(table[first_category], value=table[first_category][0],
                                             label="Width × height", allow_custom_value=True)
                if missing:
                    gr.Markdown(f"Not offered on this GPU: {', '.join(missing)}. Each needs more memory than the "
                                f"{guard.available_bytes / GIB:.1f} GiB free next to the model.",
                                elem_id="sizes-left-out")
                with gr.Row():
                    seed = gr.Number(value=42, precision=0, label="Seed")
                    random_seed = gr.Checkbox(value=True, label="Random seed")
                steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                shift = gr.Slider(MIN_SHIFT, MAX_SHIFT, value=DEFAULT_SHIFT, step=0.1, label="Time shift")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Images (newest first)", columns=2, height=560, format="png",
                                     buttons=["download", "fullscreen"], elem_id="gallery")
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                timing = gr.Markdown(label="Timing", elem_id="timing")
                png = gr.File(label="PNG download", interactive=False)
        category.change(switch_category, category, resolution, queue=False, api_visibility="private")
        blocks.load(load_history, inputs=stored_browser_id, outputs=[gallery, history, stored_browser_id, browser_id],
                    queue=False, api_visibility="private")
        gr.on(
            [run.click, prompt.submit],
            generate,
            inputs=[prompt, resolution, seed, random_seed, steps, shift, history, browser_id],
            outputs=[gallery, history, seed_used, timing, png],
            api_name=API_NAME,
            # Raw values reach the handler, so the engine checks every field and names it in its message
            # (Gradio's own conversions would fail first, some without a message a person can use).
            preprocess=False,
            concurrency_limit=1,
            concurrency_id=GPU_QUEUE,
        )
        gr.api(images, api_name=IMAGES_API_NAME, concurrency_limit=1, concurrency_id=GPU_QUEUE,
               api_visibility="undocumented")
    return blocks
