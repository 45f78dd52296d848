"""What a caller is told when a request fails: one message a person can act on, and a kind that API routes map to
an HTTP status. The kind travels as the Gradio error's title, which the UI shows above the message."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from pipeline.engine_types import GenerationError, ServiceBusy
from pipeline.requests import RequestError

log = logging.getLogger("zimage.webui")

INVALID = "Invalid request"  # the caller can fix it: HTTP 400
BUSY = "Busy"  # try again later: HTTP 503
FAILED = "Generation failed"  # a valid request the model could not turn into an image: HTTP 500
INTERNAL = "Internal error"  # a bug or a broken device: HTTP 500, with an incident id for the log


@contextmanager
def reported_to_the_caller() -> Iterator[None]:
    """Turn the engine's errors into a gr.Error for the caller; anything unexpected is logged with an incident id
    and reported by that id only, so no internal detail leaks."""
    try:
        yield
    except RequestError as error:
        raise gr.Error(str(error), title=INVALID, print_exception=False) from None
    except ServiceBusy as error:
        raise gr.Error(str(error), title=BUSY, print_exception=False) from None
    except GenerationError as error:
        raise gr.Error(str(error), title=FAILED, print_exception=False) from None
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.exception("request failed incident=%s", incident)
        raise gr.Error(f"The server hit an internal error (incident {incident}); the operator's log has the "
                       f"details. Try again.", title=INTERNAL, print_exception=False) from None
