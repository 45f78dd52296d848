"""The lock files against what is installed and what pyproject.toml asks for, and the start's check of the guarded
libraries' versions."""

from __future__ import annotations

import tomllib
from importlib import metadata

from packaging.requirements import Requirement

from config import lock
from config.lock import GUARDS_AT_STAKE, locked_versions, unlocked_libraries
from tests.helpers import PROJECT_DIR

LOCKS = PROJECT_DIR / "requirements"


def test_what_is_installed_is_what_the_test_lock_pins():
    """CI installs from requirements/test.lock: the suite runs against exactly its versions (torch apart)."""
    locked = locked_versions((LOCKS / "test.lock").read_text())
    differing = {name: (version, metadata.version(name)) for name, version in locked.items()
                 if metadata.version(name) != version}
    assert differing == {}


def test_every_lock_pins_what_pyproject_asks_for_within_its_ranges():
    project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]
    sets = {"service.lock": [], "scale.lock": ["scale"], "test.lock": ["test", "scale"]}
    for name, extras in sets.items():
        locked = locked_versions((LOCKS / name).read_text())
        wanted = [Requirement(text) for text in project["dependencies"]]
        wanted += [Requirement(text) for extra in extras for text in project["optional-dependencies"][extra]]
        for requirement in wanted:
            if requirement.name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
                continue
            key = requirement.name.lower().replace("_", "-")
            assert key in locked, f"{name} pins no {requirement.name}"
            assert requirement.specifier.contains(locked[key], prereleases=True), (name, requirement, locked[key])
        assert "torch" not in locked  # installed first, the CPU or CUDA build, by scripts/setup.sh


def test_the_guarded_libraries_as_locked_give_no_warning():
    assert unlocked_libraries() == []


def test_a_guarded_library_other_than_locked_is_named_with_its_guards(tmp_path, monkeypatch):
    other = tmp_path / "service.lock"
    other.write_text("gradio==5.0.0 \\\n    --hash=sha256:00\nuvicorn==" + metadata.version("uvicorn") + "\n")
    monkeypatch.setattr(lock, "SERVICE_LOCK", other)
    [sentence] = unlocked_libraries()
    assert sentence.startswith(f"gradio {metadata.version('gradio')} is installed, the lock pins 5.0.0")
    assert GUARDS_AT_STAKE["gradio"] in sentence
