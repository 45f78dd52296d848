"""The official Z-Image demo's resolution table: three size categories × eleven aspect ratios."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.requests import parse_size

RESOLUTIONS = {
    "1024": ["1024x1024 ( 1:1 )", "1152x896 ( 9:7 )", "896x1152 ( 7:9 )", "1152x864 ( 4:3 )", "864x1152 ( 3:4 )",
             "1248x832 ( 3:2 )", "832x1248 ( 2:3 )", "1280x720 ( 16:9 )", "720x1280 ( 9:16 )",
             "1344x576 ( 21:9 )", "576x1344 ( 9:21 )"],
    "1280": ["1280x1280 ( 1:1 )", "1440x1120 ( 9:7 )", "1120x1440 ( 7:9 )", "1472x1104 ( 4:3 )",
             "1104x1472 ( 3:4 )", "1536x1024 ( 3:2 )", "1024x1536 ( 2:3 )", "1536x864 ( 16:9 )",
             "864x1536 ( 9:16 )", "1680x720 ( 21:9 )", "720x1680 ( 9:21 )"],
    "1536": ["1536x1536 ( 1:1 )", "1728x1344 ( 9:7 )", "1344x1728 ( 7:9 )", "1728x1296 ( 4:3 )",
             "1296x1728 ( 3:4 )", "1872x1248 ( 3:2 )", "1248x1872 ( 2:3 )", "2048x1152 ( 16:9 )",
             "1152x2048 ( 9:16 )", "2016x864 ( 21:9 )", "864x2016 ( 9:21 )"],
}

def offered(max_w: int, max_h: int, fits: Callable[[int, int], bool] | None = None) -> dict[str, list[str]]:
    """The table without the sizes over the server's limits or, with `fits`, those it refuses (not enough GPU
    memory), and without categories left empty."""
    table = {}
    for category, labels in RESOLUTIONS.items():
        fitting = [label for label in labels if _within(label, max_w, max_h, fits)]
        if fitting:
            table[category] = fitting
    return table


def offered_sizes(max_w: int, max_h: int) -> list[tuple[int, int]]:
    """The offered sizes as (width, height), the default (1024²) first: what attention plans are built ahead for."""
    return [parse_size(label) for labels in offered(max_w, max_h).values() for label in labels]


def left_out(max_w: int, max_h: int, fits: Callable[[int, int], bool]) -> list[str]:
    """The sizes within the limits that `fits` refuses: what the UI must explain rather than silently drop."""
    return [label.split(" (")[0] for labels in RESOLUTIONS.values() for label in labels
            if _within(label, max_w, max_h, None) and not _within(label, max_w, max_h, fits)]


def _within(label: str, max_w: int, max_h: int, fits: Callable[[int, int], bool] | None) -> bool:
    width, height = parse_size(label)
    return width <= max_w and height <= max_h and (fits is None or fits(width, height))
