"""The versions requirements/service.lock pins, for the start's check that the libraries the guards reach into are
the ones they were written and tested against."""

from __future__ import annotations

import re
from importlib import metadata

from config.settings import PROJECT_DIR

SERVICE_LOCK = PROJECT_DIR / "requirements" / "service.lock"
# What stops applying, silently, if a library is not the version the lock pins (the guards fail open).
GUARDS_AT_STAKE = {
    "gradio": "webui.gradio_surface's table of Gradio's routes and its reads of Gradio's private attributes, the "
              "stream pool's reading of Gradio's event streams (webui.limits), webui.event_inputs",
    "uvicorn": "webui.connections' request deadlines, connection cap and head limits (uvicorn's h11 protocol)",
}


def locked_versions(lock_text: str) -> dict[str, str]:
    """name → version for each `name==version` line of a lock file (names normalised as pip does)."""
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock_text, re.MULTILINE)}


def unlocked_libraries() -> list[str]:
    """One sentence for each guarded library whose installed version is not the one the lock pins."""
    try:
        locked = locked_versions(SERVICE_LOCK.read_text())
    except OSError as error:
        return [f"{SERVICE_LOCK} cannot be read ({error.strerror}): the versions of "
                f"{', '.join(GUARDS_AT_STAKE)} are unchecked"]
    sentences = []
    for library, guards in GUARDS_AT_STAKE.items():
        installed = metadata.version(library)
        if installed != locked.get(library):
            sentences.append(f"{library} {installed} is installed, the lock pins {locked.get(library, 'none')}: "
                             f"untested with {guards}; install from the lock (scripts/setup.sh)")
    return sentences
