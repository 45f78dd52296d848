"""A person's path through the UI: headless Chromium loads the page, types a prompt, clicks Generate, sees the image."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline.storage import read_parameters
from pipeline.random_adapters import KeyFormat, write_random_adapter
from tests.helpers import ARTIFACTS_DIR, demo_model_with_adapters, http_status, start_demo_app, stop_app, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless as root on a machine with no network: no sandbox, and none of Chromium's background connections.
VIEWPORT = {"width": 1400, "height": 1000}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_app(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("browser-app")
    demo_model_with_adapters(root, tiny_models, "ink")
    app = start_demo_app(root, tiny_models, engine_process=True)
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def chromium():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run scripts/setup.sh --test (installs Debian's chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(chromium):
    return chromium.new_context(viewport=VIEWPORT).new_page()


def open_ui(page, url):
    # Gradio keeps a connection open for its queue, so "network idle" never comes; wait for the form instead.
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#prompt textarea").wait_for(state="visible", timeout=60_000)


def generate_in(page, prompt: str) -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)",
                           timeout=120_000)


def open_and_count_gallery(page, url) -> int:
    """Open the UI; the images in its gallery once the page's load event (the owner's history, answered without the
    queue) has come back and the page has drawn it."""
    with page.expect_response(lambda response: "/gradio_api/run/" in response.url, timeout=60_000):
        open_ui(page, url)
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    return page.locator("#gallery img").count()


def test_page_loads_labelled_as_demo(page, browser_app):
    open_ui(page, browser_app.url)
    assert page.title() == "Z-Image-Turbo"
    assert "DEMO MODEL" in page.locator("#demo-banner").inner_text()


def test_typing_a_prompt_and_clicking_generate_shows_the_image(page, browser_app):
    open_ui(page, browser_app.url)
    page.locator("#prompt textarea").fill("a paper boat on a pond, 池塘里的纸船")
    page.locator("#generate").click()
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)",
                           timeout=60_000)
    assert "s**" not in page.locator("#timing").inner_text()  # rendered as Markdown, not shown raw
    assert " s" in page.locator("#timing").inner_text()
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS_DIR / "ui-generated.png"), full_page=True)
    saved = [p for p in browser_app.output_dir.rglob("*.png")]
    assert len(saved) == 1


def test_empty_prompt_shows_the_error_to_the_person(page, browser_app):
    open_ui(page, browser_app.url)
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    page.get_by_text("prompt is empty").first.wait_for(state="visible", timeout=30_000)
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS_DIR / "ui-error.png"), full_page=True)


def test_each_browser_sees_its_own_images_and_keeps_them_across_reloads(chromium, browser_app):
    first = chromium.new_context(viewport=VIEWPORT).new_page()
    assert open_and_count_gallery(first, browser_app.url) == 0
    generate_in(first, "made in the first browser")
    assert open_and_count_gallery(first, browser_app.url) == 1  # a reload: the same browser, its image back
    stranger = chromium.new_context(viewport=VIEWPORT).new_page()
    assert open_and_count_gallery(stranger, browser_app.url) == 0
    first.context.close()
    stranger.context.close()


def test_each_user_sees_their_own_images_in_any_browser_and_after_a_restart(chromium, tmp_path, tiny_models):
    users = tmp_path / "users"
    users.write_text("alice:wonderland\nbob:builder\n")
    users.chmod(0o600)

    def browser_of(user: str, password: str):
        return chromium.new_context(viewport=VIEWPORT, http_credentials={"username": user, "password": password})

    app = start_demo_app(tmp_path, tiny_models, "--auth-file", str(users))
    try:
        alice = browser_of("alice", "wonderland").new_page()
        open_ui(alice, app.url)
        generate_in(alice, "alice's secret prompt")
    finally:
        app.process.kill()
        app.process.wait()
    app = start_demo_app(tmp_path, tiny_models, "--auth-file", str(users))
    try:
        elsewhere = browser_of("alice", "wonderland").new_page()  # another browser: no localStorage in common
        assert open_and_count_gallery(elsewhere, app.url) == 1
        bob = browser_of("bob", "builder").new_page()
        assert open_and_count_gallery(bob, app.url) == 0
        assert "alice's secret prompt" not in bob.content()
    finally:
        stop_app(app)


def _screenshot(page, state: str) -> None:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS_DIR / f"ui-{state}.png"), full_page=True)


def _images(app) -> list:
    return sorted(app.output_dir.rglob("*.png"))


def test_a_persons_hour_examples_ctrl_enter_status_refusal_and_reuse(chromium, browser_app):
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    open_and_count_gallery(page, browser_app.url)
    status = page.locator("#status")
    status.get_by_text("waiting").wait_for(timeout=30_000)
    assert "pipeline" in status.inner_text() and "up " in status.inner_text()
    assert page.locator("#seed-used").count() == 0 or not page.locator("#seed-used").is_visible()  # none yet
    _screenshot(page, "fresh")

    # An example fills the prompt; Ctrl+Enter generates exactly one image.
    page.get_by_text("A ginger cat in a red knitted scarf").first.click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('ginger cat')",
                           timeout=30_000)
    before = len(_images(browser_app))
    page.locator("#prompt textarea").press("Control+Enter")
    page.locator("#status").get_by_text("Denoising").wait_for(timeout=60_000)  # the step progress, on the status line
    _screenshot(page, "running")
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)",
                           timeout=120_000)
    page.wait_for_function("() => document.querySelector('#timing').innerText.includes(' s')", timeout=60_000)
    assert len(_images(browser_app)) == before + 1
    [made] = [read_parameters(path) for path in _images(browser_app)
              if "ginger cat" in read_parameters(path)["prompt"]]
    seed_shown = page.get_by_label("Seed used").input_value()
    assert seed_shown == str(made["seed"])
    timing_shown = page.locator("#timing").inner_text()
    _screenshot(page, "done")

    # A refusal: a toast with the message; the gallery, the seed and the timing keep their values.
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    page.get_by_text("prompt is empty").first.wait_for(state="visible", timeout=30_000)
    assert page.locator("#gallery img").count() == 1
    assert page.get_by_label("Seed used").input_value() == seed_shown
    assert page.locator("#timing").inner_text() == timing_shown
    assert len(_images(browser_app)) == before + 1
    _screenshot(page, "refused")

    # Reuse: the selected image's own settings come back into the form, its seed fixed.
    page.locator("#gallery img").first.click()
    page.locator("#reuse").click()
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.includes('ginger cat')",
                           timeout=30_000)
    assert page.get_by_label("Seed", exact=True).input_value() == str(made["seed"])
    assert not page.get_by_label("Random seed").is_checked()
    _screenshot(page, "reused")
    page.context.close()


def test_three_tabs_that_click_generate_together_each_see_their_place_in_line(chromium, browser_app):
    """Before, the third tab saw a greyed "0 waiting" while two jobs were ahead of it (Gradio's own "queue: 2/2"
    clipped by the status box)."""
    pages = []
    for _ in range(3):
        page = chromium.new_context(viewport=VIEWPORT).new_page()
        open_ui(page, browser_app.url)
        page.locator("#prompt textarea").fill("a slow lighthouse at dusk")
        page.get_by_label("Width × height").fill("1024x1024")
        pages.append(page)
    for page in pages:
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Denoising").or_(page.locator("#status").get_by_text("ahead of you")) \
            .first.wait_for(timeout=60_000)
    pages[2].locator("#status").get_by_text("2 ahead of you").wait_for(timeout=30_000)
    _screenshot(pages[2], "third-in-line")
    pages[2].locator("#status").get_by_text("1 ahead of you").wait_for(timeout=120_000)  # refreshed as it moves
    for page in pages:
        page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)",
                               timeout=180_000)


def test_an_open_page_generates_again_after_the_engine_process_is_killed_without_a_reload(chromium, browser_app):
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    loads = []
    page.on("load", lambda _page: loads.append(1))
    open_ui(page, browser_app.url)
    generate_in(page, "before the engine process dies")
    shown = page.locator("#gallery img").count()
    # The running engine process's pid, from the log (not its standby's).
    killed = int(re.findall(r"zimage\.engine_process engine process ready number=\d+ pid=(\d+) ",
                            browser_app.log())[-1])
    os.kill(killed, signal.SIGKILL)
    page.locator("#prompt textarea").fill("after the engine process died")
    page.locator("#generate").click()
    page.wait_for_function(f"() => document.querySelectorAll('#gallery img').length > {shown}", timeout=120_000)
    assert len(loads) == 1, "the page was loaded again"
    assert re.search(rf"engine process exited number=\d+ pid={killed} signal=SIGKILL", browser_app.log())
    newest = max(browser_app.output_dir.rglob("*.png"), key=lambda path: path.stat().st_mtime)
    assert read_parameters(newest)["prompt"] == "after the engine process died"


def test_a_person_picks_an_adapter_and_its_strength_sees_it_in_the_result_and_reuses_it(chromium, browser_app):
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    open_and_count_gallery(page, browser_app.url)
    page.get_by_text("LoRA adapters").click()
    page.locator("#adapters input").click()
    page.get_by_role("option", name="ink").click()
    page.get_by_text("Strength of ink").wait_for(state="visible", timeout=30_000)
    strength = page.locator("#strength-0 input[type=number]")
    strength.fill("0.6")
    strength.press("Tab")
    assert not page.locator("#strength-1").is_visible()  # one slider per chosen adapter
    generate_in(page, "a heron in the reeds")
    page.wait_for_function("() => document.querySelector('#timing').innerText.includes('LoRA')", timeout=60_000)
    assert "ink 0.6" in page.locator("#timing").inner_text()
    newest = max(_images(browser_app), key=lambda path: path.stat().st_mtime)
    parameters = read_parameters(newest)
    assert parameters["prompt"] == "a heron in the reeds"
    assert [(lora["name"], lora["scale"]) for lora in parameters["loras"]] == [("ink", 0.6)]

    # Reuse brings the adapter and its strength back, after the form was cleared of them.
    page.locator("#adapters button[aria-label='Remove ink'], #adapters .token-remove").first.click()
    page.get_by_text("Strength of ink").wait_for(state="hidden", timeout=30_000)
    page.locator("#gallery img").first.click()
    page.locator("#reuse").click()
    page.get_by_text("Strength of ink").wait_for(state="visible", timeout=30_000)
    assert float(strength.input_value()) == 0.6
    _screenshot(page, "adapters")

    # An adapter file added to the folder is offered once the page loads again: no restart.
    write_random_adapter(browser_app.output_dir.parent / "demo-model" / "loras" / "grain.safetensors",
                         KeyFormat.COMFYUI, rank=4, seed=9)
    deadline = time.monotonic() + 30
    while "grain" not in urllib.request.urlopen(f"{browser_app.url}/v1/loras", timeout=10).read().decode():
        assert time.monotonic() < deadline, "the new adapter was never listed"
        time.sleep(0.2)
    open_and_count_gallery(page, browser_app.url)
    page.get_by_text("LoRA adapters").click()
    page.locator("#adapters input").click()
    page.get_by_role("option", name="grain").wait_for(timeout=30_000)
    page.context.close()


def _upload_folder(app) -> Path:
    return Path(re.search(r"gradio temp dir (\S+) \(mode 700", app.log())[1])


def _choose_file(page, picture: Path) -> None:
    """`picture` chosen in the image editor's file input once the editor's canvas is there (a file chosen before it
    starts up is dropped), until the editor shows it: on a loaded machine a person may have to choose it again too."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator("#editor canvas").first.wait_for(state="attached", timeout=60_000)
    for _ in range(3):
        page.locator("#editor input[type=file]").set_input_files(str(picture))
        try:
            page.locator("#editor").get_by_text("Upload an image").wait_for(state="hidden", timeout=20_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError("the image editor never showed the chosen picture")


def _click_edit(page, app) -> Path:
    """Click Edit; the image it saves."""
    before = set(_images(app))
    page.locator("#edit").click()
    wait_until(lambda: set(_images(app)) - before, 120, "the edit's image saved")
    [saved] = set(_images(app)) - before
    return saved


def _paint_across(page) -> None:
    """One brush stroke across the middle of the image editor's canvas."""
    page.locator("#editor button[aria-label='Brush']").click()
    box = page.locator("#editor canvas").first.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.45, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, y, steps=8)
    page.mouse.up()


def test_a_person_uploads_a_picture_paints_a_region_and_gets_it_repainted_then_edits_a_result(chromium, browser_app,
                                                                                            tmp_path):
    picture = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (200, 40, 30)).save(picture)
    page = chromium.new_context(viewport=VIEWPORT).new_page()
    open_and_count_gallery(page, browser_app.url)
    page.get_by_text("Edit an image").click()
    _choose_file(page, picture)
    _paint_across(page)
    page.locator("#prompt textarea").fill("a red door in a white wall")
    painted = _click_edit(page, browser_app)
    parameters = read_parameters(painted)
    assert parameters["mode"] == "inpaint" and parameters["strength"] == 0.6
    assert (parameters["width"], parameters["height"]) == (96, 64)  # the picture's own size
    assert parameters["prompt"] == "a red door in a white wall"
    page.wait_for_function("(name) => [...document.querySelectorAll('#gallery img')].some(i => i.src.includes(name))",
                           arg=painted.name, timeout=60_000)
    assert "Edit: inpainting at strength 0.6" in page.locator("#timing").inner_text()
    # Nothing uploaded can be fetched back (what the edit read is deleted; what the editor sent while the stroke was
    # painted stays until the folder's next sweep: webui.editor_uploads).
    for path in [path for path in _upload_folder(browser_app).rglob("*") if path.is_file()]:
        assert http_status(f"{browser_app.url}/gradio_api/file={path}") == 404
    _screenshot(page, "edit-inpaint")

    # The result, from the gallery, edited again as a whole: image-to-image at the strength chosen.
    page.locator("#gallery img").first.click()
    page.locator("#edit-selected").click()
    strength = page.locator("#edit-strength input[type=number]")
    strength.fill("0.3")
    strength.press("Tab")
    parameters = read_parameters(_click_edit(page, browser_app))
    assert parameters["mode"] == "image" and parameters["strength"] == 0.3
    assert (parameters["width"], parameters["height"]) == (96, 64)

    # Reusing an edit's settings brings its strength back with the rest (on the page opened again: its gallery,
    # newest first, from the history).
    open_and_count_gallery(page, browser_app.url)
    page.locator("#gallery img").first.click()
    page.get_by_text("Edit an image").click()
    strength.fill("0.9")
    strength.press("Tab")
    page.locator("#reuse").click()
    page.wait_for_function("() => document.querySelector('#edit-strength input[type=number]').value == '0.3'",
                           timeout=30_000)
    page.context.close()
