"""The table of Gradio's routes against Gradio's own, and a real `app.py --demo` walked over raw sockets: every
spelling of a closed route is closed, no request header moves the page's own URLs, and no client can make a 5xx
with a request that has an Origin and no Host."""

from __future__ import annotations

import json
import re

import gradio as gr
import pytest

from tests.helpers import get_request, raw_exchange, start_demo_app, stop_app
from webui.gradio_surface import (
    ROUTES,
    Kind,
    classify,
    gradio_route_templates,
    mounted_gradio_app,
    refusal,
    unlisted_routes,
)
from webui.server import build_app

CLOSED_TEMPLATES = sorted({route.template for route in ROUTES if route.kind is Kind.CLOSED})


@pytest.fixture(scope="module")
def gradio_app():
    with gr.Blocks() as blocks:
        text = gr.Textbox()
        text.submit(lambda value: value, text, text)
    return gr.routes.App.create_app(blocks)


def test_the_table_lists_every_route_gradio_serves_and_no_other(gradio_app):
    assert unlisted_routes(gradio_app) == []
    served = {(template, method) for template, methods in gradio_route_templates(gradio_app) for method in methods}
    assert {(route.template, method) for route in ROUTES for method in route.methods} == served


def test_the_start_checks_the_app_the_service_mounts():
    with gr.Blocks() as blocks:
        text = gr.Textbox()
        text.submit(lambda value: value, text, text)
    mounted = mounted_gradio_app(build_app(blocks, [], [], root_path=""))
    assert mounted.get_blocks() is blocks
    served = {(template, method) for template, methods in gradio_route_templates(mounted) for method in methods}
    assert unlisted_routes(mounted) == [] and ("/gradio_api/queue/join", "POST") in served


def _concrete(template: str) -> str:
    """A path that `template` matches: each parameter filled with a word, a path parameter with two segments."""
    return re.sub(r"\{[a-z_]+(:path)?\}", lambda match: "a/b" if match.group(1) else "x", template)


@pytest.mark.parametrize("template", CLOSED_TEMPLATES)
def test_each_closed_route_is_refused_as_starlette_would_route_it(template):
    path = _concrete(template)
    route, parameters = classify(path, next(iter(next(r for r in ROUTES if r.template == template).methods)))
    assert route is not None and route.template == template and refusal(route, parameters)


@pytest.mark.parametrize("argument", ["http://example.com/x", "https://example.com/x", "HTTP://example.com/x",
                                      "hTtPs://example.com", "//example.com/x", " http://example.com", "ftp://x",
                                      "file:///etc/passwd"])
def test_the_file_route_given_a_url_in_any_spelling_is_refused(argument):
    route, parameters = classify(f"/gradio_api/file={argument}", "GET")
    assert route.kind is Kind.FILE and refusal(route, parameters)


def test_the_file_route_serves_paths():
    route, parameters = classify("/gradio_api/file=/srv/zimage/.cache/gradio-temp/7860/a/b.png", "GET")
    assert route.kind is Kind.FILE and refusal(route, parameters) is None


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    running = start_demo_app(tmp_path_factory.mktemp("surface-app"), tiny_models)
    yield running
    stop_app(running)


def _spellings(path: str) -> set[str]:
    """`path` as a client may write it so that the server reads the same path: its slashes (after the first) and
    its '=' percent-encoded, upper or lower case, and with a trailing slash."""
    head, rest = path[:1], path[1:]
    return {path, path + "/", head + rest.replace("/", "%2f"), head + rest.replace("/", "%2F"),
            path.replace("=", "%3D"), head + rest.replace("/", "%2F", 1), re.sub(r"[a-z]", lambda m: m.group(0), path)
            .replace("gradio_api", "%67radio_api")}


def _closed_requests() -> list[tuple[str, str]]:
    requests = []
    for route in ROUTES:
        if route.kind is Kind.CLOSED:
            requests += [(method, spelling) for method in sorted(route.methods)
                         for spelling in _spellings(_concrete(route.template))]
    for target in ("http://127.0.0.1:9/x", "https://example.com/x", "HTTP://example.com/x", "%68ttp://example.com/x"):
        for spelling in ("/gradio_api/file=" + target, "/gradio_api/file/" + target, "/gradio_api/file%2f" + target,
                         "/gradio_api/file%3D" + target, "/gradio_api/proxy=" + target):
            requests += [("GET", spelling), ("HEAD", spelling)]
    return requests


@pytest.mark.e2e
def test_every_spelling_of_every_closed_route_is_a_404_of_the_service(app):
    answers = {}
    for method, path in _closed_requests():
        request = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
                   f"Connection: close\r\n\r\n").encode()
        status, _, body = raw_exchange(app, request)
        answers[(method, path)] = (status, body)
    not_closed = {request: status for request, (status, _) in answers.items() if status != 404}
    assert not_closed == {}
    # Closed by the service, not by a route behind it: the service's own answer, for every one.
    assert all(b"is no route of this service" in body for (method, _), (_, body) in answers.items()
               if method != "HEAD")
    assert "unhandled error" not in app.log()


@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/gradio_api/deep_link?session_hash=x", "/monitoring", "/monitoring/summary",
                                  "/gradio_api/dev/reload", "/gradio_api/component_server",
                                  "/gradio_api/file=https://pypi.org/simple/", "/gradio_api/file=http%3A//pypi.org/",
                                  "/gradio_api/upload_progress?upload_id=x", "/gradio_api/cancel",
                                  "/gradio_api/custom_component/x/client/js/index.js"])
def test_gradio_routes_the_service_has_no_use_for_are_not_found(app, path):
    status, _, body = raw_exchange(app, get_request(path))
    # Gradio's own answer 200 (upload_progress a 404 of its own, after keeping the id; cancel 422 to a GET), its deep
    # link writes a file, and its file route fetches a URL it is given from any public address (here, with no route
    # out, its check of the address answers 403 instead)
    assert status == 404 and b"is no route of this service" in body


@pytest.mark.e2e
def test_the_page_served_through_the_table_still_works(app):
    for path in ("/", "/config", "/gradio_api/info", "/theme.css", "/gradio_api/queue/status"):
        status, _, _ = raw_exchange(app, get_request(path))
        assert status == 200, path


@pytest.mark.e2e
@pytest.mark.parametrize("header", ["X-Forwarded-Host: evil.example", "X-Gradio-Server: http://evil.example",
                                    "X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https",
                                    "Forwarded: host=evil.example"])
def test_no_request_header_moves_the_pages_own_urls(app, header):
    port = app.url.rsplit(":", 1)[1]
    for path in ("/config", "/"):
        status, _, body = raw_exchange(app, (f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{header}\r\n"
                                             f"Connection: close\r\n\r\n").encode())
        assert status == 200 and b"evil.example" not in body
    config = json.loads(raw_exchange(app, (f"GET /config HTTP/1.1\r\nHost: localhost:{port}\r\n{header}\r\n"
                                           f"Connection: close\r\n\r\n").encode())[2])
    assert config["root"] == f"http://localhost:{port}"  # the address the request came to, over plain HTTP


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_http_1_0_with_an_origin_and_no_host_is_refused_not_a_server_error(app, method):
    status, _, body = raw_exchange(app, (f"{method} / HTTP/1.0\r\nOrigin: http://evil.example\r\n"
                                         f"Content-Length: 0\r\n\r\n").encode())
    assert status in (400, 403), body
    assert "ASGI callable returned without starting response" not in app.log()
