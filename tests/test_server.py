"""The middleware's order: one list, each place with its reason; swapping two whose order matters fails here."""

from __future__ import annotations

import gradio as gr
import pytest

from webui.asgi_errors import AnswerUnhandledErrors
from webui.auth import RequireCredentials
from webui.gradio_surface import ClassifyGradioRoutes
from webui.limits import GuardGradioCalls, LimitBodySize
from webui.origin import RefuseCrossSite
from webui.server import MIDDLEWARE_ORDER, service_middleware
from webui.streams import StreamPool

# (outer, inner, why the outer must come first)
MUST_WRAP = [
    (AnswerUnhandledErrors, RequireCredentials, "a failure anywhere is answered as JSON"),
    (RequireCredentials, ClassifyGradioRoutes, "nothing is spent on a request without credentials"),
    (ClassifyGradioRoutes, RefuseCrossSite, "RefuseCrossSite reads the tag for the budgeted routes"),
    (ClassifyGradioRoutes, LimitBodySize, "a job's wait counts from its request's arrival, before its body"),
    (ClassifyGradioRoutes, GuardGradioCalls, "the budgets, joins and streams are found by the tag"),
    (RefuseCrossSite, GuardGradioCalls, "another site's page cannot spend the budgets"),
    (LimitBodySize, GuardGradioCalls, "GuardGradioCalls reads a body whole"),
]


@pytest.mark.parametrize("outer, inner, why", MUST_WRAP, ids=[f"{o.__name__}>{i.__name__}" for o, i, _ in MUST_WRAP])
def test_each_middleware_wraps_those_that_rely_on_it(outer, inner, why):
    assert MIDDLEWARE_ORDER.index(outer) < MIDDLEWARE_ORDER.index(inner), why


@pytest.mark.parametrize("credentials", [{}, {"alice": "pw"}], ids=["open", "auth"])
def test_the_service_builds_its_middleware_in_that_order(credentials):
    with gr.Blocks() as blocks:
        text = gr.Textbox()
        text.submit(lambda value: value, text, text, api_name="echo")
    built = service_middleware(blocks, [], StreamPool(limit=8, per_client=8, loopback="loopback"),
                               credentials=credentials, links=None, own_hosts=None)
    assert [entry.cls for entry in built] == [cls for cls in MIDDLEWARE_ORDER
                                              if credentials or cls is not RequireCredentials]
