"""Callers' mistakes in calls to the page's events, against a real `app.py --demo` process over raw HTTP: Gradio
answered each with a 500 and a traceback; each is now a 400 naming the field, and a right call still goes through."""

from __future__ import annotations

import json

import pytest

from tests.helpers import post_json, start_demo_app, stop_app
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
    ("/gradio_api/run/load_example", {"data": ["1"]}),
    ("/gradio_api/api/load_example", {"data": [True]}),
    ("/gradio_api/run/predict", {"data": [999], "fn_index": 0}),
])
def test_an_example_number_past_the_examples_is_refused(app, path, body):
    error = _refused(app, path, body)
    assert error["param"] == "data[0]" and f"0 to {len(EXAMPLES) - 1}" in error["message"]
    assert "unhandled error" not in app.log()


def test_an_example_by_its_number_is_loaded(app):
    status, answer = post_json(app, "/gradio_api/run/load_example", {"data": [1]})
    assert status == 200, answer
    assert json.loads(answer)["data"][0]["value"] == EXAMPLES[1]
