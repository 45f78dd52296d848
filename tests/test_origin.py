"""Cross-site requests: a page on another site cannot make images, our own pages and non-browser clients can."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.helpers import start_demo_app, stop_app
from webui.origin import foreign_origin, host_name, is_loopback_name

EVIL = "http://evil.example"
FORGED_JSON = json.dumps({"data": ["a cat"]}).encode()  # what a form or a fetch() with text/plain can post


@pytest.mark.parametrize(("headers", "foreign"), [
    ({b"host": b"127.0.0.1:7860", b"origin": b"http://127.0.0.1:7860"}, False),
    # An SSH tunnel from another local port: the browser addresses, and names, the tunnel's end.
    ({b"host": b"localhost:8000", b"origin": b"http://localhost:8000"}, False),
    ({b"host": b"gpu.example.com", b"origin": b"https://GPU.example.com"}, False),
    ({b"host": b"127.0.0.1:7860"}, False),
    ({b"host": b"127.0.0.1:7860", b"origin": EVIL.encode()}, True),
    ({b"host": b"127.0.0.1:7860", b"origin": b"http://127.0.0.1:7861"}, True),
    ({b"host": b"127.0.0.1:7860", b"origin": b"null"}, True),  # sandboxed frames, file:// pages
    ({b"origin": b"http://127.0.0.1:7860"}, True),  # no Host: nothing to be the same as
    ({b"host": b"127.0.0.1:7860", b"referer": b"http://127.0.0.1:7860/?x=1"}, False),
    ({b"host": b"127.0.0.1:7860", b"referer": EVIL.encode() + b"/page"}, True),
])
def test_foreign_origin_decides_by_origin_then_referer_against_host(headers, foreign):
    assert (foreign_origin(headers) is not None) is foreign


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1:7860", True), ("localhost:8000", True), ("LOCALHOST", True), ("127.9.9.9", True), ("[::1]:7860", True),
    ("app.localhost:7860", True), ("rebind.attacker.example:7860", False), ("10.0.0.5:7860", False),
    ("localhost.attacker.example", False), ("[::1", False), ("", False),
])
def test_loopback_names_are_told_from_every_other(host, loopback):
    assert is_loopback_name(host_name(host)) is loopback


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    running = start_demo_app(tmp_path_factory.mktemp("origin-app"), tiny_models)
    yield running
    stop_app(running)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def saved_pngs(app) -> set:
    return set(app.output_dir.rglob("*.png"))


@pytest.mark.e2e
def test_another_sites_page_is_refused_and_makes_no_image(app):
    before = saved_pngs(app)
    openai_body = json.dumps({"prompt": "a cat", "size": "256x256", "steps": 1}).encode()
    status, body = post(f"{app.url}/v1/images/generations", openai_body,
                        {"Content-Type": "text/plain", "Origin": EVIL})
    assert status == 403
    assert body["error"]["code"] == "forbidden_origin" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    for content_type, data in (("text/plain", FORGED_JSON), ("application/x-www-form-urlencoded", b"data=a+cat")):
        status, body = post(f"{app.url}/gradio_api/call/generate", data, {"Content-Type": content_type,
                                                                          "Origin": EVIL})
        assert status == 403 and "Cross-site request refused" in body["error"]
    # An older browser that sends only a Referer is held to the same rule.
    status, _ = post(f"{app.url}/v1/images/generations", openai_body, {"Referer": f"{EVIL}/page.html"})
    assert status == 403
    assert saved_pngs(app) == before
    assert "cross-site request refused method=POST path='/v1/images/generations' origin='http://evil.example'" \
        in app.log()
    assert app.log().count("cross-site request refused") == 1  # a line an interval, however many a page sends


@pytest.mark.e2e
@pytest.mark.parametrize("origin", [None, "own"], ids=["no-origin", "same-origin"])
def test_own_pages_and_clients_without_origin_are_served(app, origin):
    headers = {"Content-Type": "application/json"} | ({"Origin": app.url} if origin else {})
    before = saved_pngs(app)
    openai_body = json.dumps({"prompt": "a cat", "size": "256x256", "steps": 1}).encode()
    status, body = post(f"{app.url}/v1/images/generations", openai_body, headers)
    assert status == 200 and len(body["data"]) == 1
    assert len(saved_pngs(app) - before) == 1
    # A value for each of the API's six inputs, the five after the prompt null: the job fails in the engine's check.
    call_body = json.dumps({"data": ["a cat", None, None, None, None, None]}).encode()
    status, body = post(f"{app.url}/gradio_api/call/generate", call_body, headers)
    assert status == 200 and "event_id" in body  # the call reached Gradio's queue


def get_headers(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {name.lower(): value for name, value in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {name.lower(): value for name, value in error.headers.items()}


@pytest.mark.e2e
def test_another_sites_page_cannot_spend_the_page_loads_budget_but_its_links_still_open_the_page(app):
    """<img src=".../config"> a hundred times on another site's page would spend the server-wide budget of page loads
    (webui.limits) that the operator's own page needs."""
    embedded = {"Referer": f"{EVIL}/page", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    assert get_headers(f"{app.url}/config", embedded)[0] == 403
    no_referrer = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}  # referrerpolicy="no-referrer"
    assert get_headers(f"{app.url}/gradio_api/info", no_referrer)[0] == 403
    link_followed = {"Referer": f"{EVIL}/page", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert get_headers(f"{app.url}/", link_followed)[0] == 200
    # A browser too old to send Sec-Fetch-Mode may be following a link too.
    assert get_headers(f"{app.url}/", {"Referer": f"{EVIL}/page"})[0] == 200
    # Elsewhere a read another site's page embeds goes on, as before: it spends nothing shared.
    assert get_headers(f"{app.url}/v1/models", embedded)[0] == 200


@pytest.mark.e2e
def test_a_page_whose_name_was_rebound_to_loopback_is_refused(app):
    """DNS rebinding: evil.example's page, its name now resolving to 127.0.0.1, sends Host and Origin that agree."""
    before = saved_pngs(app)
    rebound = app.url.replace("127.0.0.1", "rebind.attacker.example")
    openai_body = json.dumps({"prompt": "a cat", "size": "64x64", "steps": 1}).encode()
    status, body = post(f"{app.url}/v1/images/generations", openai_body,
                        {"Content-Type": "application/json", "Host": rebound.removeprefix("http://"),
                         "Origin": rebound})
    assert status == 403 and body["error"]["code"] == "forbidden_host" and "--public-url" in body["error"]["message"]
    assert get_headers(f"{app.url}/gradio_api/info", {"Host": "rebind.attacker.example"})[0] == 403
    assert saved_pngs(app) == before
    assert "request for another host refused method=POST path='/v1/images/generations' host='rebind.attacker" \
        in app.log()


@pytest.mark.e2e
def test_behind_a_proxy_another_sites_page_cannot_read_what_gradio_would_grant_it(tmp_path, tiny_models):
    """Gradio grants every origin, credentials included, once Host is not localhost: as behind the README's proxy,
    which passes the public name on. A fetch from another site's page is refused instead, so there is nothing to
    read; our own page, a link followed from another site and an embedded read of a route with no shared budget are
    served."""
    proxied = start_demo_app(tmp_path, tiny_models, "--public-url", "https://gpu-box.example.com")
    try:
        public = {"Host": "gpu-box.example.com"}
        assert get_headers(f"{proxied.url}/gradio_api/info", public | {"Origin": EVIL})[0] == 403
        # A preflight is Gradio's to answer (its middleware wraps ours); the request that follows it is refused.
        status, _ = post(f"{proxied.url}/v1/images/generations", b'{"prompt": "x"}',
                         public | {"Content-Type": "application/json", "Origin": EVIL})
        assert status == 403
        assert get_headers(f"{proxied.url}/v1/models", public | {"Referer": f"{EVIL}/page"})[0] == 200
        assert get_headers(f"{proxied.url}/", public | {"Referer": f"{EVIL}/page", "Sec-Fetch-Mode": "navigate"})[0] \
            == 200
        assert get_headers(f"{proxied.url}/gradio_api/info",
                           public | {"Origin": "https://gpu-box.example.com"})[0] == 200
        # The public name is this server's; any other still is not.
        assert get_headers(f"{proxied.url}/readyz", {"Host": "other.example.com"})[0] == 403
    finally:
        stop_app(proxied)
