"""Callers' mistakes in calls to the page's events that Gradio answers with a 500 and a traceback in the log, or
with a message that quotes its components' Python reprs and echoes every value sent: a call by keyword
(`call/v2/NAME`) with a parameter the endpoint does not take or without one it needs (Gradio's own argument check
raises a TypeError its route does not catch), fewer values in `data` than the event has inputs, and an example's
number past the page's examples (`run/load_example`: the examples' list raises an IndexError). Checked first
(PageEvents.problem, by webui.limits.GuardGradioCalls), each gets a 400 naming the field, and nothing reaches
Gradio."""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from pipeline.requests import shown
from webui.gradio_surface import (
    CALL_BY_KEYWORD_PATH,
    CALL_PATH,
    QUEUE_JOIN_PATH,
    UI_EVENT_PATHS,
    example_count,
    page_events,
)

# Gradio's keyword route takes this one beside an endpoint's parameters (and drops it where the endpoint has no use).
GRADIO_OWN_KEYWORDS = frozenset({"oauth_token"})


@dataclass(frozen=True)
class Parameters:
    """An endpoint's keyword parameters, as Gradio's API info lists them."""

    names: tuple[str, ...]
    required: frozenset[str]


@dataclass(frozen=True)
class Inputs:
    """An event's inputs, named for messages: all of them (what the page sends), and those an API call (call/NAME)
    may send instead, Gradio filling the others (a gr.State) itself. `queued`: the event runs through the queue,
    so Gradio refuses it on run/ (404) whatever its inputs. `optional`: the values of its last inputs that a call
    may leave out (inputs the event gained later: callers written before them keep working)."""

    names: tuple[str, ...]
    api_names: tuple[str, ...]
    queued: bool
    optional: tuple[object, ...] = ()


@dataclass(frozen=True)
class ExamplePick:
    """An event that loads one of `count` examples, given its number as input `position`."""

    position: int
    count: int


@dataclass(frozen=True)
class PageEvents:
    """The page's events as callers reach them, from Gradio's own API info and components (`of`): `indices`, every
    event's fn_index; `small`: fn_index → api name of the events that skip the queue; `api_names`, the named ones;
    `parameters`: api name → its keyword parameters; `inputs`: fn_index → the event's inputs; `example_picks`:
    fn_index → the example input it takes; `fn_indices`: api name → fn_index."""

    indices: frozenset[int]
    small: dict[int, str] = field(default_factory=dict)
    api_names: frozenset[str] = frozenset()
    parameters: dict[str, Parameters] = field(default_factory=dict)
    inputs: dict[int, Inputs] = field(default_factory=dict)
    example_picks: dict[int, ExamplePick] = field(default_factory=dict)
    fn_indices: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, blocks: gr.Blocks, optional: dict[str, tuple[object, ...]] | None = None) -> PageEvents:
        """`optional`: api name → the values of the event's last inputs that a call may leave out."""
        optional = optional or {}
        endpoints = blocks.get_api_info(all_endpoints=True)["named_endpoints"]
        # A parameter without a name takes no keyword: Gradio fills it by position only.
        parameters = {name.lstrip("/"): Parameters(
            names=tuple(parameter["parameter_name"] for parameter in endpoint["parameters"]
                        if "parameter_name" in parameter),
            required=frozenset(parameter["parameter_name"] for parameter in endpoint["parameters"]
                               if "parameter_name" in parameter and not parameter.get("parameter_has_default", False)))
            for name, endpoint in endpoints.items()}
        events = page_events(blocks)
        example_picks = {index: ExamplePick(position, example_count(component))
                         for index, fn in events.items()
                         for position, component in enumerate(fn.inputs) if isinstance(component, gr.Dataset)}
        # An API call's inputs by the names its callers know them by: the endpoint's parameters.
        inputs = {index: Inputs(names=tuple(_input_name(block) for block in fn.inputs),
                                api_names=parameters[fn.api_name].names if fn.api_name in parameters else
                                tuple(_input_name(block) for block in fn.inputs if not block.skip_api),
                                queued=fn.queue, optional=tuple(optional.get(fn.api_name, ())))
                  for index, fn in events.items()}
        return cls(indices=frozenset(events),
                   small={index: fn.api_name for index, fn in events.items() if not fn.queue},
                   api_names=frozenset(fn.api_name for fn in events.values() if fn.api_name), parameters=parameters,
                   inputs=inputs, example_picks=example_picks,
                   fn_indices={fn.api_name: index for index, fn in events.items() if fn.api_name})

    def problem(self, path: str, fields: dict | None) -> tuple[str, str] | None:
        """What is wrong with the inputs of a POST to one of the page's events at `path` with the JSON object body
        `fields` (None: not a JSON object, which Gradio's own validation answers), as (message, field); None if
        nothing Gradio would fail on. An fn_index is known to name an event and an API name to be the page's
        (webui.limits.GuardGradioCalls checks both first)."""
        if fields is None:
            return None
        if path.startswith(CALL_BY_KEYWORD_PATH):
            return self._keyword_problem(path.rstrip("/").rpartition("/")[2], fields)
        fn_index = self._fn_index(path, fields)
        data = fields.get("data")
        if fn_index is None or not isinstance(data, list):
            return None  # Gradio's own validation answers these
        if path.startswith(UI_EVENT_PATHS) and self.inputs[fn_index].queued:
            return None  # Gradio refuses a queued event on run/ (404) whatever it is sent
        return (self._count_problem(fn_index, data, api_call=path.startswith(CALL_PATH))
                or self._example_problem(fn_index, data))

    def completed(self, path: str, fields: dict | None) -> dict | None:
        """`fields` with the values of the optional inputs added where its `data` left all of them out (the shape
        callers sent before the event gained them), or None where it needs none. For a call problem() let through."""
        fn_index = self._fn_index(path, fields) if fields is not None else None
        data = fields.get("data") if fields is not None else None
        if fn_index is None or not isinstance(data, list) or not self.inputs[fn_index].optional:
            return None
        inputs = self.inputs[fn_index]
        if len(data) in self._shapes(inputs, path.startswith(CALL_PATH), without_optional=True):
            return {**fields, "data": [*data, *inputs.optional]}
        return None

    def _fn_index(self, path: str, fields: dict) -> int | None:
        """The page's event a positional call reaches, as Gradio picks it: call/NAME by its name; run/ by the body's
        fn_index, else by its name. None for a call by keyword, or one naming no event of the page."""
        if path.startswith(CALL_BY_KEYWORD_PATH):
            return None
        name = path.rstrip("/").rpartition("/")[2]
        fn_index = self.fn_indices.get(name) if path.startswith(CALL_PATH) else fields.get("fn_index")
        if fn_index is None and path != QUEUE_JOIN_PATH:
            fn_index = self.fn_indices.get(name)
        return fn_index if isinstance(fn_index, int) and fn_index in self.inputs else None

    def _keyword_problem(self, name: str, fields: dict) -> tuple[str, str] | None:
        parameters = self.parameters.get(name)
        if parameters is None:
            return None
        takes = ", ".join(parameters.names) or "none"
        for key in fields:
            if key not in parameters.names and key not in GRADIO_OWN_KEYWORDS:
                return f"{shown(key)} is not a parameter of {name} (its parameters: {takes}).", key
        missing = sorted(parameters.required - fields.keys())
        if missing:
            return f"{missing[0]} is required by {name} (its parameters: {takes}).", missing[0]
        return None

    def _count_problem(self, fn_index: int, data: list, api_call: bool) -> tuple[str, str] | None:
        """Fewer values than inputs (Gradio ignores extra ones); an API call may send only those of the API; either
        may leave out all of the optional ones at the end (completed() adds them), not some."""
        inputs = self.inputs[fn_index]
        if len(data) >= len(inputs.names) or len(data) in self._shapes(inputs, api_call, without_optional=False) \
                or len(data) in self._shapes(inputs, api_call, without_optional=True):
            return None
        names = inputs.api_names if api_call else inputs.names
        required = names[:len(names) - len(inputs.optional)]
        optional = names[len(required):]
        return (f"data must hold {len(required)} values, one for each input ({', '.join(required)})"
                + (f", or {len(names)} with the optional {', '.join(optional)}" if optional else "")
                + f"; got {len(data)}.", "data")

    @staticmethod
    def _shapes(inputs: Inputs, api_call: bool, without_optional: bool) -> set[int]:
        """The lengths a call's data may have: every input (the page's), or an API call's, with or without the
        optional ones."""
        lengths = {len(inputs.names)} | ({len(inputs.api_names)} if api_call else set())
        return {length - len(inputs.optional) for length in lengths} if without_optional else lengths

    def _example_problem(self, fn_index: int, data: list) -> tuple[str, str] | None:
        pick = self.example_picks.get(fn_index)
        if pick is None or len(data) <= pick.position:
            return None
        number = data[pick.position]
        if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < pick.count:
            return None
        return f"data[{pick.position}] must be an example's number, 0 to {pick.count - 1} (got {shown(number)}).", \
            f"data[{pick.position}]"


def _input_name(block: gr.components.Component) -> str:
    """What a message calls an input: its label on the page, else its kind ("state")."""
    return getattr(block, "label", None) or type(block).__name__.lower()
