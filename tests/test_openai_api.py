"""The OpenAI-style routes, /metrics and --auth on a real `app.py --demo` process, driven by the official `openai`
client, prometheus_client's parser and plain HTTP."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote, unquote, urlsplit

import openai
import pytest
from PIL import Image

from pipeline.random_adapters import KeyFormat, write_random_adapter
from pipeline.storage import PARAMETERS_KEY
from tests.helpers import (
    ADAPTER_STD,
    PROJECT_DIR,
    connect,
    demo_model_with_adapters,
    fill_the_queue,
    http_status,
    multipart_body,
    parse_samples,
    post_request,
    raw_exchange,
    start_demo_app,
    stop_app,
    wait_until,
)

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alice", "wonderland"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    # A space and a '#' in every path the app uses: image links must carry them percent-encoded.
    root = tmp_path_factory.mktemp("openai app #")
    # Adapters in the folder beside the weights, where the service looks by default.
    demo_model_with_adapters(root, tiny_models, "ink wash")
    write_random_adapter(root / "demo-model" / "loras" / "film.safetensors", KeyFormat.DIFFUSERS, rank=8, seed=2,
                         std=ADAPTER_STD)
    app = start_demo_app(root, tiny_models, "--auth", f"{USER}:{PASSWORD}")
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=f"{USER}:{PASSWORD}", max_retries=0, timeout=120)


def get(url: str, authorization: str | None = BASIC) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def metric_samples(app) -> dict[tuple[str, tuple], float]:
    return parse_samples(get(f"{app.url}/metrics").decode())


def test_the_openai_client_gets_n_images_with_consecutive_seeds(client, app):
    response = client.images.generate(model="z-image-turbo", prompt="a lighthouse at dusk", n=2, size="256x192",
                                      response_format="b64_json", extra_body={"seed": 7, "steps": 2, "shift": 2.5})
    assert len(response.data) == 2
    for item, seed in zip(response.data, (7, 8), strict=True):
        png = base64.b64decode(item.b64_json)
        image = Image.open(io.BytesIO(png))
        # Encoded once: the bytes the client got are the file on disk, byte for byte.
        (saved,) = [path for path in app.output_dir.rglob(f"*-seed{seed}.png")
                    if json.loads(Image.open(path).text[PARAMETERS_KEY])["prompt"] == "a lighthouse at dusk"]
        assert saved.read_bytes() == png
        assert image.size == (256, 192)
        parameters = json.loads(image.text[PARAMETERS_KEY])
        assert (parameters["seed"], parameters["steps"], parameters["shift"]) == (seed, 2, 2.5)
        assert f"Seed: {seed}," in image.text["parameters"]


def test_url_responses_open_their_one_png_without_credentials(client, app):
    (item,) = client.images.generate(prompt="a red bicycle", size="128x128", response_format="url",
                                     extra_body={"steps": 1}).data
    assert item.url.startswith(f"{app.url}/v1/images/files/")
    assert str(app.output_dir.resolve()) not in unquote(item.url)  # a link tells nobody where the files are kept
    # As a browser, or another service the link is handed to, fetches it: no credentials, the signature opens it.
    png = get(item.url, authorization=None)
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    unsigned, _, query = item.url.partition("?")
    assert get(unsigned) == png  # with the credentials, as before
    signature = query.partition("signature=")[2]
    for forged in (unsigned, item.url.replace(signature, "0" * len(signature)),
                   item.url.replace(".png?", "x.png?"), item.url.replace("expires=", "expires=1")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(forged, authorization=None)
        assert refused.value.code == 401, forged


def test_the_image_route_serves_saved_pngs_and_nothing_else(client, app):
    (item,) = client.images.generate(prompt="a blue kite", size="128x128", response_format="url",
                                     extra_body={"steps": 1}).data
    name = unquote(urlsplit(item.url).path).removeprefix("/v1/images/files/")
    saved = app.output_dir / name
    status, headers, body = raw_exchange(app, _get_head(f"/v1/images/files/{name}", "Range: bytes=0-7"))
    assert status == 206 and body == saved.read_bytes()[:8] and headers["content-type"] == "image/png"
    outside = app.output_dir.parent / "outside.png"  # a PNG beside the output dir, one ".." away
    outside.write_bytes(saved.read_bytes())
    partial = saved.parent / ".partial-write.tmp"
    partial.write_bytes(b"half an image")
    hidden = saved.parent / "notes.txt"
    hidden.write_text("not an image")
    for path in (f"/v1/images/files/{quote(str(outside))}", f"/v1/images/files/{saved.parent.name}/../../outside.png",
                 "/v1/images/files/%2e%2e/outside.png", f"/v1/images/files/{saved.parent.name}/{partial.name}",
                 f"/v1/images/files/{saved.parent.name}/{hidden.name}", "/v1/images/files/",
                 f"/v1/images/files/{quote(str(saved))}",  # the file itself, by its absolute path: where it is kept
                 "/v1/images/files/a%00.png", f"/v1/images/files/{'a' * 300}.png",
                 f"/v1/images/files/{'a/' * 3000}x.png"):
        status, _, body = raw_exchange(app, _get_head(path))
        assert status == 404, path
        assert json.loads(body)["error"]["code"] == "image_not_found", path


def test_a_request_with_two_authorization_headers_is_refused_and_counts_against_nobody(app):
    """The credential check and the route's own call into the queue would each read another one of them: refused,
    as a mistake, not counted as wrong credentials (20 of those lock every loopback client out)."""
    body = json.dumps({"prompt": "a kite", "size": "64x64", "steps": 1}).encode()
    for _ in range(25):
        status, _, answer = raw_exchange(app, "\r\n".join([
            "POST /v1/images/generations HTTP/1.1", "Host: localhost", "Content-Type: application/json",
            "Connection: close", f"Content-Length: {len(body)}", "Authorization: Bearer x:y",
            f"Authorization: {BASIC}", "", ""]).encode() + body)
        assert status == 400 and "one Authorization header" in json.loads(answer)["error"]["message"]
    assert get(f"{app.url}/v1/models")  # the right credentials still work: no lockout
    assert "wrong credentials refused user='x'" not in app.log()


def _get_head(path: str, *fields: str) -> bytes:
    """A GET with credentials, as written: a client library would resolve the dots itself."""
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close",
                          f"Authorization: {BASIC}", *fields]) + "\r\n\r\n").encode()


def test_a_forged_host_header_does_not_decide_the_returned_url(app):
    # A loopback name is this server's (an SSH tunnel may map another port), but it does not make the link.
    status, answer = _raw_generation(app, "Host: localhost:1")
    assert status == 200 and answer["data"][0]["url"].startswith(f"{app.url}/v1/images/files/")


def test_the_configured_public_url_is_the_base_of_returned_urls(tmp_path, tiny_models):
    public = start_demo_app(tmp_path, tiny_models, "--public-url", "https://images.example.com/zimage")
    try:
        status, answer = _raw_generation(public, "Host: localhost")
    finally:
        stop_app(public)
    assert status == 200 and answer["data"][0]["url"].startswith("https://images.example.com/zimage/v1/images/files/")


def _raw_generation(app, *fields: str) -> tuple[int, dict]:
    """One url-format generation over a raw socket, with these header lines (a client library sets Host itself)."""
    body = json.dumps({"prompt": "a kite", "size": "128x128", "steps": 1, "response_format": "url"}).encode()
    head = ["POST /v1/images/generations HTTP/1.1", "Content-Type: application/json", "Connection: close",
            f"Content-Length: {len(body)}", f"Authorization: Bearer {USER}:{PASSWORD}", *fields]
    status, _, answer = raw_exchange(app, ("\r\n".join(head) + "\r\n\r\n").encode() + body, timeout=60)
    return status, json.loads(answer)


def test_models_lists_the_one_model_and_finds_it_by_id(client):
    assert [model.id for model in client.models.list()] == ["z-image-turbo"]
    assert client.models.retrieve("z-image-turbo").id == "z-image-turbo"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("dall-e-3")
    assert missing.value.body["code"] == "model_not_found" and "'dall-e-3'" in missing.value.body["message"]


@pytest.mark.parametrize("arguments, message, param", [
    ({"prompt": "x", "size": "100x100"}, "multiple of 16", "size"),
    ({"prompt": "x", "n": 5}, "n must be a whole number from 1 to 4", "n"),
    ({"prompt": "   "}, "prompt", "prompt"),
    ({"prompt": "x", "extra_body": {"steps": "eight"}}, "steps must be a whole number", "steps"),
    ({"prompt": "x", "extra_body": {"steps": 99}}, "steps must be between 1 and 50", "steps"),
    ({"prompt": "x", "model": "dall-e-3"}, "model must be 'z-image-turbo'", "model"),
    ({"prompt": "x", "response_format": "png"}, "response_format must be one of", "response_format"),
    ({"prompt": "x", "extra_body": {"output_format": "gif"}}, "output_format must be one of png, jpeg, webp",
     "output_format"),
    ({"prompt": "x", "extra_body": {"output_format": "jpeg", "output_compression": 101}},
     "output_compression must be from 0 to 100", "output_compression"),
    ({"prompt": "x", "extra_body": {"stream": True}}, "stream must be false", "stream"),
    ({"prompt": "x", "extra_body": {"step": 4}}, "Unknown parameter: 'step'", "step"),
    ({"prompt": "x", "extra_body": {"background": "transparent"}}, "no transparency", "background"),
    ({"prompt": "p" * 20_001}, "prompt is 20001 characters long; the limit is 20000", "prompt"),
])
def test_bad_input_is_a_400_in_openai_shape_and_the_service_goes_on(client, app, arguments, message, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(**arguments)
    assert refused.value.status_code == 400 and message in refused.value.body["message"]
    assert refused.value.body["param"] == param
    assert http_status(f"{app.url}/readyz") == 200


def post_raw(app, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"{app.url}/v1/images/generations", data=body, method="POST",
                                     headers={"Authorization": BASIC, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_batch_is_checked_whole_before_its_first_image(app):
    before = len(list(app.output_dir.rglob("*.png")))
    status, body = post_raw(app, json.dumps({"prompt": "x", "n": 2, "seed": 2**64 - 1, "size": "64x64",
                                             "steps": 1}).encode())
    assert status == 400 and body["error"]["param"] == "seed" and "when n is 2" in body["error"]["message"]
    assert len(list(app.output_dir.rglob("*.png"))) == before  # not even the first of the two
    status, body = post_raw(app, json.dumps({"prompt": "x", "n": 3, "seed": 5.0, "size": "64x64",
                                             "steps": 1}).encode())
    assert status == 200 and [item["seed"] for item in body["data"]] == [5, 6, 7]


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "x", "seed": NaN}', "seed"),
    (b'{"prompt": NaN}', "prompt"),
    (b'{"prompt": "x", "steps": Infinity}', "steps"),
    (b'{"prompt": "x", "shift": -Infinity}', "shift"),
    (b'{"prompt": "x", "steps": 1e999}', "steps"),  # past a float's range: Python reads it as inf
    (b'{"prompt": "x", "n": ' + b"9" * 4301 + b"}", "n"),  # past Python's int-parsing limit
    (b'{"prompt": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # past the recursion limit
    (b'{"prompt": "a \\ud800 b"}', "prompt"),  # a lone surrogate, escaped
    (b'{"prompt": "a \xff\xfe b"}', "prompt"),  # bytes that are not UTF-8
    (b'{"prompt": "x", "seed": "' + b"A" * 1_000_000 + b'"}', "seed"),
    (b'{"prompt": "x", "size": "' + b"9" * 100 + b'x64"}', "size"),
    (b'{"prompt": "x", "' + b"k" * 1_000_000 + b'": 1}', None),
    (b'{"prompt": "' + b"p" * 1_000_000 + b'"}', "prompt"),  # refused here: the queue's copy would be over 1 MiB
])
def test_hostile_json_is_a_short_400_naming_the_field(app, body, param):
    status, answer = post_raw(app, body)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    # Whatever was sent, what comes back (and what the log holds) echoes a few dozen characters of it at most.
    assert len(json.dumps(answer)) < 400
    assert "A" * 100 not in app.log() and "k" * 100 not in app.log()
    assert "_NotANumber" not in answer["error"]["message"]  # the parser's own stand-in is no word for a client


def test_openai_codes_name_an_unknown_and_a_missing_parameter(app):
    assert post_raw(app, b'{"prompt": "x", "colour": "red"}')[1]["error"] == {
        "message": "Unknown parameter: 'colour'.", "type": "invalid_request_error", "param": "colour",
        "code": "unknown_parameter"}
    assert post_raw(app, b'{"size": "64x64"}')[1]["error"] == {
        "message": "Missing required parameter: 'prompt'.", "type": "invalid_request_error", "param": "prompt",
        "code": "missing_required_parameter"}


def test_fields_openai_defines_but_this_service_does_not_use_are_accepted(client):
    response = client.images.generate(prompt="a quiet harbour", size="64x64", quality="hd", style="vivid",
                                      user="someone", extra_body={"steps": 1, "background": "opaque",
                                                                  "safety_identifier": "hashed-user-7",
                                                                  "moderation": "low", "partial_images": 0})
    assert len(response.data) == 1


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", b'{"prompt": "x"}'),  # what fetch() may send cross-site without a preflight
    ("application/x-www-form-urlencoded", b"prompt=x"),  # what an HTML form sends
    ("application/json; charset=latin-1", b'{"prompt": "x"}'),
])
def test_a_body_that_is_not_declared_json_is_a_415(app, content_type, body):
    status, answer = post_raw(app, body, content_type)
    assert status == 415 and answer["error"]["type"] == "invalid_request_error"
    assert "application/json" in answer["error"]["message"]


def test_json_with_a_utf8_charset_is_accepted(app):
    status, answer = post_raw(app, b'{"prompt": "x", "size": "64x64", "steps": 1}', "application/json; charset=UTF-8")
    assert status == 200 and len(answer["data"]) == 1


def test_the_request_id_header_names_the_logs_request_lines(app):
    request = urllib.request.Request(f"{app.url}/v1/images/generations", method="POST",
                                     data=b'{"prompt": "a lantern", "size": "64x64", "steps": 1, "n": 2}',
                                     headers={"Authorization": BASIC, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        ids = response.headers["x-request-id"].split(",")
    assert len(ids) == 2
    for request_id in ids:
        assert f"request id={request_id} " in app.log()


def test_a_byte_order_mark_before_the_json_is_dropped(app):
    status, answer = post_raw(app, b'\xef\xbb\xbf{"prompt": "x", "size": "64x64", "steps": 1, "n": 2.0}')
    assert status == 200 and len(answer["data"]) == 2


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/v1/images/generations", 405, "POST"),
    ("DELETE", "/v1/models", 405, "GET, HEAD"),
    ("POST", "/v1/models/z-image-turbo", 405, "GET, HEAD"),
    ("GET", "/v1/images/edits", 405, "POST"),
    ("POST", "/v1/images/variations", 404, None),
    ("POST", "/v1/chat/completions", 404, None),
])
def test_unknown_paths_and_methods_under_v1_answer_in_openai_shape(app, method, path, status, allow):
    request = urllib.request.Request(f"{app.url}{path}", method=method, headers={"Authorization": BASIC})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == status
    error = json.loads(refused.value.read())["error"]
    assert error["type"] == "invalid_request_error" and method in error["message"]
    assert refused.value.headers["Allow"] == allow


def test_metrics_parse_and_move_with_requests(client, app):
    before = metric_samples(app)
    client.images.generate(prompt="a kettle", size="128x128", extra_body={"steps": 1})
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="a kettle", size="8x8")
    after = metric_samples(app)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert moved("zimage_requests_total", outcome="ok") == 1
    assert moved("zimage_stage_seconds_count", stage="denoise") == 1
    assert after[("zimage_model_loaded", ())] == 1 and after[("zimage_in_flight", ())] == 0
    assert after[("zimage_queue_depth", ())] == 0
    assert after[("process_start_time_seconds", ())] <= time.time()
    # Size errors are caught in the UI layer's parser before the engine, so they are not engine outcomes:
    # a bad field the engine sees is.
    rejected = ("zimage_requests_total", (("outcome", "rejected"),))
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="a kettle", extra_body={"steps": 99})
    assert metric_samples(app)[rejected] == after.get(rejected, 0) + 1
    # One this route refuses itself, before the queue, is counted and logged as the engine's own refusals are.
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="a kettle", extra_body={"colour": "red"})
    assert metric_samples(app)[rejected] == after.get(rejected, 0) + 2
    assert "images request refused status=400 param=colour reason=\"Unknown parameter: 'colour'.\"" in app.log()


def test_without_credentials_everything_but_health_is_refused(app):
    assert http_status(f"{app.url}/healthz") == 200 and http_status(f"{app.url}/readyz") == 200
    for path in ("/", "/metrics", "/v1/models", "/gradio_api/info"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(f"{app.url}{path}", authorization=None)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic")
    wrong = openai.OpenAI(base_url=f"{app.url}/v1", api_key=f"{USER}:guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert b"Z-Image-Turbo" in get(f"{app.url}/")


def test_a_public_host_without_auth_is_refused_at_start():
    result = subprocess.run([sys.executable, "app.py", "--demo", "--host", "0.0.0.0"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refusing to serve host 0.0.0.0 without authentication" in result.stderr


def test_insecure_public_is_allowed_with_a_warning_line(tmp_path):
    # No weights: the process logs its start-up lines and exits before it ever binds the public address.
    result = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--insecure-public", "--model-dir",
                             str(tmp_path)], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "WARNING zimage.app INSECURE: serving host 0.0.0.0 without authentication" in result.stdout


def test_gradio_client_reaches_the_ui_endpoint_with_basic_auth(app):
    from gradio_client import Client

    client = Client(app.url, headers={"Authorization": BASIC}, verbose=False)
    _, seed_used, _, png_path = client.predict("a teapot", "128x128", 5, False, 1, 3.0, api_name="/generate")
    assert seed_used == 5 and Image.open(png_path).size == (128, 128)


def test_a_loop_of_refused_requests_is_logged_a_bounded_number_of_times(app):
    """Last of the tests on this app: the refusals before it are each logged, as a person's would be."""
    from webui.openai_api import REFUSALS_LOGGED_PER_INTERVAL

    before = app.log().count("images request refused")
    for _ in range(3 * REFUSALS_LOGGED_PER_INTERVAL):
        assert post_raw(app, b'{"prompt": "x", "size": "huge"}')[0] == 400
    logged = app.log().count("images request refused") - before
    # Still logged, but not each time: the loop may straddle two of the 10 s intervals, no more.
    assert 1 <= logged <= 2 * REFUSALS_LOGGED_PER_INTERVAL


def test_a_failed_generation_is_a_500_with_an_id_and_a_full_queue_a_503(tmp_path, tiny_models):
    app = start_demo_app(tmp_path, tiny_models, "--queue-size", "1",
                         env={"ZIMAGE_TEST_MODE": "1", "ZIMAGE_FAULT": "nan@1"})
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=120)
    outcomes = {}

    def generate(name: str) -> None:
        try:
            client.images.generate(prompt="a slow one", size="1024x1024", extra_body={"steps": 8})
            outcomes[name] = "ok"
        except openai.APIStatusError as error:
            outcomes[name] = (error.status_code, error.body, error.response.headers.get("retry-after"))

    try:
        fill_the_queue(app, generate, timeout_s=180)
    finally:
        stop_app(app)
    status, body, _ = outcomes["running"]
    assert status == 500 and "NaN" in body["message"] and len(body["id"]) == 8
    assert f"images request failed id={body['id']}" in app.log()
    status, body, retry_after = outcomes["one too many"]
    assert status == 503 and body["code"] == "busy" and "queue is full" in body["message"]
    assert retry_after is not None and int(retry_after) > 0
    # A refusal, not a failure: no incident id, and a line an interval however many clients ask.
    assert "id" not in body and "images request refused as busy: The server is busy: the queue is full" in app.log()


def _png_of(response) -> tuple[Image.Image, dict]:
    image = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
    return image, json.loads(image.text[PARAMETERS_KEY])


def test_each_request_picks_its_adapters_by_name_through_the_openai_client(client, app):
    listed = json.loads(get(f"{app.url}/v1/loras"))["data"]
    assert [(entry["name"], entry["rank"], entry["layers"]) for entry in listed] == [("film", 8, 28),
                                                                                      ("ink wash", 4, 28)]
    hashes = {entry["name"]: entry["hash"] for entry in listed}
    before = metric_samples(app)

    def generate(prompt="a heron in reeds", loras=None):
        return client.images.generate(prompt=prompt, size="256x256", extra_body={
            "seed": 11, "steps": 2, **({"loras": loras} if loras is not None else {})})

    plain, _ = _png_of(generate())
    styled = generate(loras=[{"name": "ink wash", "scale": 0.8}, {"name": "film", "scale": -0.5}])
    assert styled.data[0].model_extra["loras"] == [{"name": "ink wash", "scale": 0.8}, {"name": "film", "scale": -0.5}]
    styled_image, parameters = _png_of(styled)
    assert parameters["loras"] == [{"name": "ink wash", "scale": 0.8, "hash": hashes["ink wash"]},
                                   {"name": "film", "scale": -0.5, "hash": hashes["film"]}]
    assert "<lora:ink wash:0.8> <lora:film:-0.5>" in styled_image.text["parameters"]
    assert styled_image.tobytes() != plain.tobytes()
    # The prompt's A1111 tags ask for the same: the same pixels. And nothing of it stays for the next request.
    tagged, _ = _png_of(generate("a heron in reeds <lora:ink wash:0.8> <lora:film:-0.5>"))
    after, _ = _png_of(generate())
    assert tagged.tobytes() == styled_image.tobytes() and after.tobytes() == plain.tobytes()
    samples = metric_samples(app)
    assert samples[("zimage_adapter_images_total", (("adapter", "ink wash"),))] - before.get(
        ("zimage_adapter_images_total", (("adapter", "ink wash"),)), 0) == 2
    assert "loras=ink wash:0.8,film:-0.5" in app.log()


@pytest.mark.parametrize(("loras", "message"), [
    ([{"name": "watercolour"}], "no adapter is named 'watercolour'; available: film, ink wash"),
    ([{"name": "film", "scale": 3}], "scale must be a number from -2 to 2"),
    ([{"name": "film", "strength": 1}], "unknown key 'strength'"),
    ("film", "loras must be a list"),
    ([{"name": "film"}] * 2, "names the adapter 'film' twice"),
    ([{"name": f"x{index}"} for index in range(5)], "the limit is 4"),
])
def test_a_bad_adapter_request_is_a_400_naming_loras(client, loras, message):
    with pytest.raises(openai.BadRequestError, match=message) as refused:
        client.images.generate(prompt="a heron", size="128x128", extra_body={"loras": loras})
    assert refused.value.body["param"] == "loras"


def test_a_non_finite_adapter_strength_is_named_not_echoed(app):
    status, body = post_raw(app, b'{"prompt": "a heron", "loras": [{"name": "film", "scale": NaN}]}')
    assert status == 400 and body["error"]["param"] == "loras" and "NaN" in body["error"]["message"]


# -- JPEG and WebP out; edits ------------------------------------------------------------------------------------

def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def _picture(width: int = 128, height: int = 128) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (gradient, gradient.rotate(90), Image.new("L", (width, height), 90)))


def _mask_left_half(width: int = 128, height: int = 128) -> bytes:
    """OpenAI's mask: transparent where the picture is to be repainted (the left half), opaque elsewhere."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return _png(mask)


@pytest.mark.parametrize("output_format, magic, mime", [("jpeg", b"\xff\xd8\xff", "image/jpeg"),
                                                        ("webp", b"RIFF", "image/webp")])
def test_jpeg_and_webp_come_back_smaller_with_their_parameters_where_a1111_puts_them(client, app, output_format,
                                                                                   magic, mime):
    from sd_parsers import ParserManager

    png = client.images.generate(prompt="a field of poppies", size="256x256", response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 31}).data[0]
    response = client.images.generate(prompt="a field of poppies", size="256x256", response_format="b64_json",
                                      extra_body={"steps": 2, "seed": 31, "output_format": output_format,
                                                  "output_compression": 80})
    data = base64.b64decode(response.data[0].b64_json)
    assert data.startswith(magic) and len(data) < len(base64.b64decode(png.b64_json)) / 2
    assert response.output_format == output_format
    (saved,) = [path for path in app.output_dir.rglob("*-seed31.*") if path.read_bytes() == data]
    (sampler,) = ParserManager().parse(saved).samplers
    assert [prompt.value for prompt in sampler.prompts] == ["a field of poppies"]
    assert sampler.parameters["seed"] == "31"
    (linked,) = client.images.generate(prompt="a field of poppies", size="64x64", response_format="url",
                                       extra_body={"steps": 1, "output_format": output_format}).data
    status, headers, body = raw_exchange(app, _get_head(urlsplit(linked.url).path))
    assert status == 200 and headers["content-type"] == mime and body.startswith(magic)


def test_the_openai_client_edits_a_picture_and_repaints_a_masked_region(client, app):
    edited = client.images.edit(image=("photo.png", _png(_picture())), prompt="the same scene in autumn",
                                size="128x128", response_format="b64_json",
                                extra_body={"strength": 0.5, "steps": 4, "seed": 12})
    result = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    parameters = json.loads(result.text[PARAMETERS_KEY])
    assert result.size == (128, 128) and (parameters["mode"], parameters["strength"]) == ("image", 0.5)
    inpainted = client.images.edit(image=("photo.png", _png(_picture())), mask=("mask.png", _mask_left_half()),
                                   prompt="a red door", response_format="b64_json", extra_body={"steps": 2})
    result = Image.open(io.BytesIO(base64.b64decode(inpainted.data[0].b64_json)))
    parameters = json.loads(result.text[PARAMETERS_KEY])
    # No size: the picture's own.
    assert result.size == (128, 128) and (parameters["mode"], parameters["strength"]) == ("inpaint", 1.0)
    assert f"mode=inpaint strength=1 source={parameters['source_sha256']}" in app.log()


def test_an_edit_without_a_size_keeps_the_pictures_aspect_and_answers_in_the_format_asked(client):
    edited = client.images.edit(image=("wide.jpg", _png(_picture(200, 100))), prompt="a wide view",
                                response_format="b64_json",
                                extra_body={"steps": 1, "output_format": "webp", "output_compression": 60})
    result = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    assert (result.format, result.size) == ("WEBP", (192, 96))


@pytest.fixture(scope="module")
def upload_app(tmp_path_factory, tiny_models):
    """An app with a 1 MB upload limit, whose temporary folder is its own: an upload must never land there."""
    root = tmp_path_factory.mktemp("upload app")
    (root / "tmp").mkdir()
    app = start_demo_app(root, tiny_models, "--max-upload-mb", "1", env={"TMPDIR": str(root / "tmp")})
    app.temp_dir = root / "tmp"
    yield app
    stop_app(app)


def _bomb() -> bytes:
    """A PNG of a few hundred bytes whose header claims 50,000 × 50,000 pixels (7.5 GB as RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _edit(app, files, fields=None, *headers: str) -> tuple[int, dict, float]:
    body, content_type = multipart_body({"prompt": "a quiet lake", "steps": "1", "size": "64x64", **(fields or {})},
                                        files)
    started = time.perf_counter()
    status, answer_headers, answer = raw_exchange(app, post_request("/v1/images/edits", body, content_type, *headers))
    return status, json.loads(answer) if answer else {}, time.perf_counter() - started


def _gif() -> bytes:
    buffer = io.BytesIO()
    _picture(64, 64).save(buffer, "GIF")
    return buffer.getvalue()


@pytest.mark.parametrize("files, fields, param, words", [
    ([("image", "bomb.png", _bomb())], {}, "image", "pixels"),
    ([("image", "cat.png", _gif())], {}, "image", "PNG, JPEG or WebP"),
    ([("image", "cut.png", _png(_picture())[:-300])], {}, "image", ""),
    ([("image", "noise.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)], {}, "image", ""),
    ([("image", "big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 1_000_001)], {}, "image", "MB"),
    ([("image", "a.png", _png(_picture())), ("mask", "m.png", _mask_left_half(64, 64))], {}, "mask", "128"),
    ([("image", "a.png", _png(_picture())), ("mask", "m.png", _png(_picture()))], {}, "mask", "transparent"),
    ([("image", "a.png", _png(_picture())), ("image", "b.png", _png(_picture()))], {}, "image", "one"),
    ([], {}, "image", "Missing required parameter"),
    ([("image", "a.png", _png(_picture()))], {"strength": "1.5"}, "strength", "from 0 to 1"),
    ([("image", "a.png", _png(_picture()))], {"strength": "lots"}, "strength", "number"),
    ([("image", "a.png", _png(_picture()))], {"loras": "[{"}, "loras", "JSON"),
    ([("image", "a.png", _png(_picture()))], {"colour": "red"}, "colour", "Unknown parameter"),
])
def test_a_bad_upload_or_field_is_a_400_naming_it_and_nothing_else_changes(upload_app, files, fields, param, words):
    saved_before = sorted(upload_app.output_dir.rglob("*.*"))
    status, answer, seconds = _edit(upload_app, files, fields)
    assert status == 400, answer
    assert answer["error"]["param"] == param and words in answer["error"]["message"]
    assert seconds < 5  # the bomb among them: refused from its header, never decoded
    assert sorted(upload_app.output_dir.rglob("*.*")) == saved_before
    assert http_status(f"{upload_app.url}/readyz") == 200


def test_uploads_are_read_in_memory_and_a_body_over_the_limit_is_a_413(upload_app):
    status, answer, _ = _edit(upload_app, [("image", "a.png", _png(_picture(64, 64)))])
    assert status == 200 and len(answer["data"]) == 1
    # Two uploads of 1 MB and the fields' MiB: anything larger is refused from its Content-Length, before its body.
    head = post_request("/v1/images/edits", b"", "multipart/form-data; boundary=b").replace(
        b"Content-Length: 0", f"Content-Length: {2 * 10**6 + 2**20 + 1}".encode())
    assert raw_exchange(upload_app, head)[0] == 413
    assert list(upload_app.temp_dir.iterdir()) == []  # nothing spooled to the temporary folder


def test_an_edit_that_is_not_a_form_is_a_415_and_a_cross_site_form_a_403(upload_app):
    status, _, answer = raw_exchange(upload_app, post_request("/v1/images/edits", b'{"prompt": "x"}',
                                                               "application/json"))
    assert status == 415 and "multipart/form-data" in json.loads(answer)["error"]["message"]
    status, _, _ = _edit(upload_app, [("image", "a.png", _png(_picture(64, 64)))], {},
                         "Origin: https://evil.example")
    assert status == 403


def test_edits_past_the_ones_being_read_are_a_503_busy_until_those_end(upload_app):
    """Four clients send the head of an edit and only part of its body: their reads hold the four places, so a fifth
    edit is told to come back (Retry-After), and once they hang up, edits are read again."""
    body, content_type = multipart_body({"prompt": "x"}, [("image", "a.png", _png(_picture(64, 64)))])
    slow = []
    for _ in range(4):
        sock = connect(upload_app)
        sock.sendall(post_request("/v1/images/edits", body, content_type)[:-100])  # the body's last bytes never come
        slow.append(sock)
    probe, probe_type = multipart_body({"prompt": "x"}, [])  # no image: a 400 whenever it is read
    deadline = time.monotonic() + 10
    while (answer := raw_exchange(upload_app, post_request("/v1/images/edits", probe, probe_type)))[0] != 503:
        assert answer[0] == 400 and time.monotonic() < deadline, answer
    status, headers, answer = answer
    assert json.loads(answer)["error"]["code"] == "busy" and headers["retry-after"] == "2"
    for sock in slow:
        sock.close()
    wait_until(lambda: raw_exchange(upload_app, post_request("/v1/images/edits", probe, probe_type))[0] == 400, 10,
               "the places given back")
