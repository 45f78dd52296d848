"""The Gradio Blocks UI. Presentation only: it turns form values into a GenerationRequest and shows the result."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import gradio as gr
from gradio.data_classes import FileData

from pipeline.engine_types import GenerationResult
from pipeline.memory import GIB
from pipeline.requests import (
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_SHIFT,
    MAX_STEPS,
    MIN_LORA_SCALE,
    MIN_SHIFT,
    GenerationRequest,
    RequestError,
    parse_size,
    shown,
)
from pipeline.serving import ServingEngine
from pipeline.storage import read_parameters
from webui.admission import AdmissionLine
from webui.arrival import received_at
from webui.editor_uploads import DECODES_AT_ONCE, UploadFolder
from webui.errors import INVALID, reported_to_the_caller
from webui.gradio_surface import forget_upload
from webui.jobs import make_images, place_in_line, run_in_line
from webui.owners import BROWSER_ID, BROWSER_STORAGE_KEY, BROWSER_STORAGE_SECRET, new_browser_id, owner_of
from webui.resolutions import left_out, offered

HISTORY_SIZE = 12  # the owner's images from disk shown when a page opens, so a restart loses no one's recent work
SESSION_HISTORY_LIMIT = 48  # the gallery goes back to the browser whole after every image: keep it bounded
API_NAME = "generate"  # the queue endpoint: gradio_client.Client(url).predict(..., api_name="/generate")
IMAGES_API_NAME = "images"  # n images for the OpenAI-style route; through the same queue
# The inputs /generate gained after its first release (the adapters and their strengths), with the values the page
# sends when none is chosen: a call written before them, which sends 6 values (or 7 with the page's state), keeps
# working (webui.event_inputs).
OPTIONAL_INPUTS = {API_NAME: ([], *[1.0] * MAX_LORAS)}

STATUS_REFRESH_S = 10
EDIT_MODES = {"inpaint": "inpainting", "image": "image-to-image"}  # pipeline.requests.Edit.mode, as the page says it
# The official Space's kind of prompt, in both languages the text encoder reads.
EXAMPLES = [
    "A ginger cat in a red knitted scarf sitting in fresh snow, soft morning light, 35mm photo",
    "雪山脚下湖边的小木屋，清晨薄雾，湖面倒影，写实摄影",
    "A neon-lit rainy street at night, reflections on wet asphalt, a lone cyclist, cinematic",
    "穿汉服的少女站在樱花树下，微风吹起花瓣，柔和的光线，细腻的插画风格",
    'A minimalist poster of a lighthouse with the words "Keep the light on" in bold serif type',
]
# Ctrl+Enter (Cmd+Enter on a Mac) anywhere on the page clicks Generate; Enter alone still makes a new line.
CTRL_ENTER_JS = """
() => {
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      event.stopPropagation();
      document.querySelector("#generate")?.click();
    }
  }, true);
}
"""

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
    loras = [f"`{choice.name}` {choice.scale:g}" for choice in result.request.loras]
    edit = result.request.edit
    edited = [] if edit is None else [f"Edit: {EDIT_MODES[edit.mode]} at strength {edit.strength:g}"]
    return "\n\n".join([text, *(["LoRA: " + " · ".join(loras)] if loras else []), *edited, *result.notices])


def _chosen_loras(names: object, strengths: tuple[object, ...]) -> list[dict]:
    """The form's adapters, each at the strength of its slider (the n-th chosen, the n-th slider)."""
    if names is None:
        return []
    if not isinstance(names, list) or len(names) > MAX_LORAS:
        raise RequestError(f"LoRA adapters must be a list of at most {MAX_LORAS} names (got {shown(names)}).",
                           "loras")
    return [{"name": name, "scale": strength} for name, strength in zip(names, strengths, strict=False)]


def _strength_sliders(names: object, values: list[float] | None = None) -> list:
    """One slider per chosen adapter, labelled with its name; the rest hidden."""
    names = names if isinstance(names, list) else []
    values = values or []
    return [gr.Slider(visible=index < len(names), label=f"Strength of {names[index]}" if index < len(names) else
                      "Strength", **({"value": values[index]} if index < len(values) else {}))
            for index in range(MAX_LORAS)]


def _uptime(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _page(state: object) -> dict:
    """The page's State: {"browser_id": ..., "images": [(path, caption), ...]}; empty for a caller that has none."""
    if isinstance(state, dict):
        return {"browser_id": state.get("browser_id"), "images": list(state.get("images") or [])}
    return {"browser_id": None, "images": []}


def build_ui(engine: ServingEngine, line: AdmissionLine, uploads: UploadFolder, *, demo: bool, model_label: str,
             max_w: int, max_h: int) -> gr.Blocks:
    """The page. `uploads`: where its image editor's files arrive (Gradio's upload route), read by the edit event."""
    guard = engine.memory_guard
    fits = guard.fits if guard is not None else None
    table = offered(max_w, max_h, fits)
    missing = left_out(max_w, max_h, fits) if fits is not None else []
    # Images are served from the output folder as they are: otherwise Gradio hashes and copies every gallery file
    # into its cache on every response, which costs more than the image itself once the gallery has a few dozen.
    gr.set_static_paths([engine.output_dir])
    first_category = next(iter(table))

    decodes = anyio.Semaphore(DECODES_AT_ONCE)

    # One parameter per strength slider (MAX_LORAS of them): Gradio places gr.Request and gr.Progress by position.
    async def generate(prompt, resolution, seed, random_seed, steps, shift, page, adapters, strength_1, strength_2,
                       strength_3, strength_4, request: gr.Request, progress=gr.Progress()):
        with reported_to_the_caller():
            width, height = parse_size(resolution, "resolution")
            generation = _form_request(prompt, seed, random_seed, steps, shift, adapters,
                                       (strength_1, strength_2, strength_3, strength_4), width=width, height=height)
        return await _in_line(generation, page, request, progress)

    async def edit(picture, strength, prompt, seed, random_seed, steps, shift, page, adapters, strength_1,
                   strength_2, strength_3, strength_4, request: gr.Request, progress=gr.Progress()):
        """The image editor's picture, at its own size, repainted where its brush layer is painted (everywhere
        when it is not), with the form's prompt and settings."""
        with reported_to_the_caller():
            async with decodes:
                read = await anyio.to_thread.run_sync(uploads.read, picture,
                                                      lambda name: forget_upload(blocks, name))
            generation = _form_request(prompt, seed, random_seed, steps, shift, adapters,
                                       (strength_1, strength_2, strength_3, strength_4), width=None, height=None,
                                       image=read.image, mask=read.mask, strength=strength)
        return await _in_line(generation, page, request, progress)

    def _form_request(prompt, seed, random_seed, steps, shift, adapters, strengths, **fields) -> GenerationRequest:
        if not isinstance(random_seed, bool):
            raise RequestError(f"random_seed must be true or false (got {shown(random_seed)}).", "random_seed")
        return GenerationRequest(prompt=prompt, steps=steps, seed=None if random_seed else seed, shift=shift,
                                 loras=_chosen_loras(adapters, strengths), **fields)

    async def _in_line(generation: GenerationRequest, page, request: gr.Request, progress: gr.Progress):
        """`generation` through the admission line, its place and progress shown; the page's outputs."""
        page = _page(page)
        with reported_to_the_caller():
            first_told = []

            def told(ahead: int, seconds: float | None) -> None:
                # Gradio's page shows a description only beside a progress fraction: the share of the wait done.
                first_told[:] = first_told or [ahead]
                progress(1 - (ahead + 1) / (first_told[0] + 1), desc=place_in_line(ahead, seconds))

            [result] = await run_in_line(
                line, engine, [generation], received_at=received_at(request),
                owner=owner_of(request, page["browser_id"]),
                progress=lambda step, total: progress((step, total), desc="Denoising"), told=told)
        # vars, not asdict: asdict would deep-copy an edit's picture and mask to read four numbers.
        images = [(str(result.path), _caption(vars(result.request))), *page["images"]][:SESSION_HISTORY_LIMIT]
        return images, {**page, "images": images}, result.request.seed, _timing(result), str(result.path)

    async def images(prompt: str, size: str | None, n: int, seed: int | None, steps: int | None,
                     shift: float | None, request: gr.Request, loras: list[dict] | None = None,
                     output_format: str = "png", output_compression: int | None = None, image: FileData | None = None,
                     mask: FileData | None = None, strength: float | None = None) -> list[dict]:
        """webui.jobs.make_images for API callers: what /generate shows as Markdown, as values a script can read
        ("file": gradio_client would take a "path" key for a file to download and drop the rest). `loras`:
        [{"name": ..., "scale": ...}, ...], adapters of the server's folder. `output_format`: png, jpeg or webp,
        `output_compression` 0-100 for the last two (OpenAI's fields). An edit: `image` (handle_file(...)), and for
        inpainting `mask`, transparent where to repaint; `strength` 0-1; `size` None for the picture's own."""
        with reported_to_the_caller():
            edit = {}
            if image is not None or mask is not None:
                if image is None:
                    raise RequestError("mask belongs to an edit; send the image to edit too.", "image")
                async with decodes:
                    read = await anyio.to_thread.run_sync(uploads.read_files, image, mask,
                                                          lambda name: forget_upload(blocks, name))
                edit = {"image": read.image, "mask": read.mask}
            if strength is not None:
                edit["strength"] = strength
            return await make_images(line, engine, prompt, size, n, seed, steps, shift, loras,
                                     received_at=received_at(request), owner=owner_of(request, None),
                                     output_format=output_format, output_compression=output_compression, **edit)

    def load_history(stored_browser_id, request: gr.Request):
        """A page opens: its browser's id (a new one on its first visit, kept in localStorage) and the owner's
        newest images."""
        browser_id = stored_browser_id if isinstance(stored_browser_id, str) and BROWSER_ID.fullmatch(
            stored_browser_id) else new_browser_id()
        owned = engine.history(HISTORY_SIZE, owner_of(request, browser_id))
        images = [(str(path), _caption(parameters)) for path, parameters in owned]
        return images, {"browser_id": browser_id, "images": images}, browser_id, _adapter_choices()

    def _adapter_choices():
        """The adapters served now, as the page opens (the folder may have changed since the page was built)."""
        return gr.Dropdown(choices=[info.name for info in engine.adapters()])

    def status_line() -> str:
        """Queue, GPU memory, uptime and which pipeline serves: what a person wants to know before waiting."""
        status = engine.status()
        running = engine.running_jobs
        parts = [f"{line.waiting} waiting" + (f" · {'one' if running == 1 else running} running" if running else ""),
                 f"up {_uptime(time.monotonic() - started_at)}",
                 f"{status.serving} pipeline" + (" (compiling)" if status.compiled == "compiling" else "")]
        if (memory := engine.gpu_memory()) is not None:
            parts.insert(1, f"GPU memory {(memory.total - memory.free) / GIB:.1f} of {memory.total / GIB:.0f} GiB "
                            f"in use")
        if status.restarting is not None:
            parts.insert(0, f"engine restarting ({status.restarting})")
        return " · ".join(parts)

    def remember_selection(event: gr.SelectData):
        return event.index

    def reuse_settings(index, page):
        """The selected image's own settings (read from its PNG) back in the form, its seed fixed."""
        images = _page(page)["images"]
        if not isinstance(index, int) or not 0 <= index < len(images):
            raise gr.Error("Select an image in the gallery first.", title=INVALID, print_exception=False)
        parameters = read_parameters(Path(images[index][0]))
        loras = parameters.get("loras") or []
        names = [lora["name"] for lora in loras]
        edited = parameters.get("strength")  # an edit's: its picture is not kept, its strength is
        return (parameters["prompt"], f"{parameters['width']}x{parameters['height']}", parameters["seed"], False,
                parameters["steps"], parameters["shift"], gr.Dropdown(value=names),
                *_strength_sliders(names, [lora["scale"] for lora in loras]),
                gr.Slider(value=edited) if edited is not None else gr.Slider())

    def edit_selected(index, page):
        """The selected image into the image editor, the edit mode opened."""
        images = _page(page)["images"]
        if not isinstance(index, int) or not 0 <= index < len(images):
            raise gr.Error("Select an image in the gallery first.", title=INVALID, print_exception=False)
        return gr.ImageEditor(value={"background": images[index][0], "layers": [], "composite": None}), \
            gr.Accordion(open=True)

    def switch_category(category):
        choices = table.get(category, [])
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None)

    started_at = time.monotonic()
    with gr.Blocks(title="Z-Image-Turbo") as blocks:
        gr.Markdown(f"# Z-Image-Turbo\nModel: `{model_label}`")
        if demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        # The page's own state: its browser's id and the images in its gallery. One State, so /generate keeps the
        # inputs it always had; a REST caller passing null for it owns no gallery.
        page = gr.State(None)
        stored_browser_id = gr.BrowserState(None, storage_key=BROWSER_STORAGE_KEY, secret=BROWSER_STORAGE_SECRET)
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
                with gr.Accordion("LoRA adapters", open=False):
                    adapters = gr.Dropdown([info.name for info in engine.adapters()], value=[], multiselect=True,
                                           max_choices=MAX_LORAS, label="Adapters", elem_id="adapters",
                                           info=f"Up to {MAX_LORAS}, from the server's adapter folder; or write "
                                                f"<lora:name:0.8> in the prompt.")
                    strengths = [gr.Slider(MIN_LORA_SCALE, MAX_LORA_SCALE, value=1.0, step=0.05, label="Strength",
                                           visible=False, elem_id=f"strength-{index}")
                                 for index in range(MAX_LORAS)]
                run = gr.Button("Generate (Ctrl+Enter)", variant="primary", elem_id="generate")
                with gr.Accordion("Edit an image", open=False, elem_id="edit-mode") as edit_mode:
                    gr.Markdown("Upload or paste a picture (or pick one in the gallery and click “Edit this "
                                "image”), paint over what should change — or nothing, to redraw all of it — and "
                                "click Edit. The prompt and settings above apply; the result has the picture's "
                                "shape.")
                    editor = gr.ImageEditor(label="Picture to edit", sources=["upload", "clipboard"], layers=False,
                                            transforms=(), format="png", elem_id="editor",
                                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                            eraser=gr.Eraser())
                    edit_strength = gr.Slider(0, 1, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
                                              elem_id="edit-strength",
                                              info="How much is drawn anew: 0 keeps the picture, 1 draws it from "
                                                   "scratch (only where you painted, if you did).")
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
                gr.Examples([[example] for example in EXAMPLES], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=1):
                status = gr.Markdown(status_line, elem_id="status")
                gallery = gr.Gallery(label="Images (newest first)", columns=2, height=560, format="png",
                                     buttons=["download", "fullscreen"], elem_id="gallery")
                with gr.Row():
                    reuse = gr.Button("Reuse the selected image's settings", size="sm", elem_id="reuse")
                    edit_this = gr.Button("Edit this image", size="sm", elem_id="edit-selected")
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False, visible=False,
                                      elem_id="seed-used")
                timing = gr.Markdown(label="Timing", elem_id="timing")
                png = gr.File(label="PNG download", interactive=False)
        selected = gr.State(None)
        category.change(switch_category, category, resolution, queue=False, api_visibility="private")
        gallery.select(remember_selection, None, selected, queue=False, api_visibility="private")
        adapters.change(_strength_sliders, adapters, strengths, queue=False, api_visibility="private")
        reuse.click(reuse_settings, [selected, page],
                    [prompt, resolution, seed, random_seed, steps, shift, adapters, *strengths, edit_strength],
                    queue=False, api_visibility="private")
        edit_this.click(edit_selected, [selected, page], [editor, edit_mode], queue=False, api_visibility="private")
        gr.Timer(STATUS_REFRESH_S).tick(status_line, None, status, queue=False, show_progress="hidden",
                                        api_visibility="private")
        blocks.load(None, js=CTRL_ENTER_JS)
        blocks.load(load_history, inputs=stored_browser_id, outputs=[gallery, page, stored_browser_id, adapters],
                    queue=False, api_visibility="private")
        generated = gr.on(
            [run.click, prompt.submit],
            generate,
            inputs=[prompt, resolution, seed, random_seed, steps, shift, page, adapters, *strengths],
            outputs=[gallery, page, seed_used, timing, png],
            api_name=API_NAME,
            # Raw values reach the handler, so the engine checks every field and names it in its message
            # (Gradio's own conversions would fail first, some without a message a person can use).
            preprocess=False,
            # Gradio hands every event on at once: the admission line (webui.admission) is where jobs wait.
            concurrency_limit=None,
            # Progress, and a refusal's mark, on the status line only: the gallery, seed, timing and PNG keep
            # their last good values (a refusal's message comes as a toast).
            show_progress_on=status,
        )
        edited = edit_button.click(
            edit, inputs=[editor, edit_strength, prompt, seed, random_seed, steps, shift, page, adapters, *strengths],
            outputs=[gallery, page, seed_used, timing, png], api_visibility="private", preprocess=False,
            concurrency_limit=None, show_progress_on=status)
        # Shown once there is a seed to show (a fresh page's 0 read as "the seed was 0"); a UI-only step, so the
        # API's answer stays the number itself.
        for done in (generated, edited):
            done.success(lambda: gr.Number(visible=True), None, seed_used, queue=False, api_visibility="private")
        gr.api(images, api_name=IMAGES_API_NAME, concurrency_limit=None)
    return blocks
