"""Callers' mistakes in calls to the page's events, against a real `app.py --demo` process over raw HTTP: Gradio
answered each with a 500 and a traceback; each is now a 400 naming the field, and a right call still goes through."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.helpers import fn_index_of, post_json, start_demo_app, stop_app
from webui.ui import EXAMPLES

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models):
    app = start_demo_app(tmp_path_factory.mktemp("event-inputs-app"), tiny_models)
    yield app
    stop_app(app)


def _refused(app, path: str, body: object) -> dict:
    status, answer = post_json(app, path, body)
    assert status == 400, answer
    return json.loads(answer)["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a kite", "negative_prompt": "rain"}, "negative_prompt"),
    ({"steps": 2}, "prompt"),
    ({}, "prompt"),
])
def test_a_call_by_keyword_with_a_wrong_parameter_is_refused_naming_it(app, body, param):
    error = _refused(app, "/gradio_api/call/v2/generate", body)
    assert error["param"] == param and param in error["message"] and "prompt" in error["message"]
    assert "unhandled error" not in app.log()


def test_a_call_by_keyword_with_its_parameters_is_queued(app):
    status, answer = post_json(app, "/gradio_api/call/v2/generate", {"prompt": "a kite", "steps": 2})
    assert status == 200 and "event_id" in json.loads(answer), answer


@pytest.mark.parametrize("path, body", [
    ("/gradio_api/run/load_example", {"data": [len(EXAMPLES)]}),
    ("/gradio_api/run/load_example", {"data": [-1]}),
    ("/gradio_api/run/load_example", {"data": [None]}),
    ("/gradio_api/run/load_example", {"data": ["1"]}),
    ("/gradio_api/api/load_example", {"data": [True]}),
    ("/gradio_api/run/predict", {"data": [999], "fn_index": "load_example"}),
    # Gradio runs the event the body's fn_index names, whatever the path's name
    ("/gradio_api/run/status_line", {"data": [999], "fn_index": "load_example"}),
])
def test_an_example_number_past_the_examples_is_refused(app, path, body):
    if "fn_index" in body:
        body["fn_index"] = fn_index_of(app, body["fn_index"])
    error = _refused(app, path, body)
    assert error["param"] == "data[0]" and f"0 to {len(EXAMPLES) - 1}" in error["message"]
    assert "unhandled error" not in app.log()


def test_an_example_by_its_number_is_loaded(app):
    status, answer = post_json(app, "/gradio_api/run/load_example", {"data": [1]})
    assert status == 200, answer
    assert json.loads(answer)["data"][0]["value"] == EXAMPLES[1]


@pytest.mark.parametrize("path, body, names", [
    ("/gradio_api/call/generate", {"data": ["a kite"]}, "prompt, resolution, seed, random_seed, steps, shift"),
    ("/gradio_api/queue/join", {"data": ["a kite"], "fn_index": "generate", "session_hash": "short-data"},
     "Prompt, Width × height, Seed"),
    ("/gradio_api/run/load_example", {"data": []}, "Example prompts"),
])
def test_fewer_values_than_an_event_has_inputs_are_refused_naming_them(app, path, body, names):
    if "fn_index" in body:
        body["fn_index"] = fn_index_of(app, body["fn_index"])
    error = _refused(app, path, body)
    assert error["param"] == "data" and names in error["message"] and "object at 0x" not in error["message"]


@pytest.mark.parametrize("data", [["a kite", "64x64", 1, False, 1, 3.0], ["a kite", "64x64", 1, False, 1, 3.0, None]],
                         ids=["api-values", "every-input"])
def test_a_call_written_before_generate_took_adapters_still_makes_its_image(app, data):
    """/generate gained the adapters and their strengths as its last inputs: a caller that sends the values it sent
    before (the API's six, or every input then, the page's state too) gets its image, made without adapters."""
    status, answer = post_json(app, "/gradio_api/call/generate", {"data": data})
    assert status == 200, answer
    event_id = json.loads(answer)["event_id"]
    with urllib.request.urlopen(f"{app.url}/gradio_api/call/generate/{event_id}", timeout=60) as response:
        events = response.read().decode()
    assert "event: complete" in events, events
    assert re.search(r"request id=\w+ prompt=.* size=64x64 steps=1 seed=1 shift=3 wait_ms", app.log())
