"""The README's commands, as a newcomer copies them: each points at the venv's Python and a script that exists,
uses only flags that script has, and the ones that run on a CPU in seconds are run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import PROJECT_DIR

README = (PROJECT_DIR / "README.md").read_text()
VENV_PYTHON = ".venv/bin/python"


def _command_lines() -> list[str]:
    """Shell commands of the README: lines of ```bash blocks, and inline `.venv/bin/python ...` spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    lines += re.findall(r"`((?:sudo )?\.venv/bin/python [^`]+)`", README)
    indented = README.replace("\\\n", " ")  # indented (four-space) blocks, continuation lines joined
    lines += [line.strip() for line in re.findall(r"^    ((?:sudo )?\.venv/bin/python .*)$", indented, flags=re.M)]
    return lines


def _python_commands() -> list[list[str]]:
    commands = []
    for line in _command_lines():
        words = shlex.split(line)
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:1] == [VENV_PYTHON] and words[1:2] != ["-m"]:
            commands.append(words[1:])
    return commands


def test_no_command_runs_a_bare_python():
    bare = [line for line in _command_lines() if re.match(r"(sudo )?(PYTHONPATH=\S+ )?python3? ", line)]
    assert bare == [], "use .venv/bin/python: the system python has no torch"


def test_shell_scripts_the_readme_runs_are_executable():
    for line in _command_lines():
        word = shlex.split(line)[0]
        if word.startswith("scripts/"):
            assert (PROJECT_DIR / word).stat().st_mode & 0o111, f"{word} is not executable"


@pytest.mark.parametrize("arguments", _python_commands(), ids=lambda arguments: " ".join(arguments)[:60])
def test_every_python_command_names_a_script_that_has_its_flags(arguments):
    script = PROJECT_DIR / arguments[0]
    assert script.is_file(), f"{arguments[0]} does not exist"
    shown = subprocess.run([sys.executable, str(script), "--help"], cwd=PROJECT_DIR, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    given = arguments[1:arguments.index("--")] if "--" in arguments else arguments[1:]
    for flag in (word.split("=")[0] for word in given if word.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", shown.stdout), f"{arguments[0]} has no {flag}"


def test_the_tiny_model_and_manifest_commands_run_as_written(tmp_path):
    """README: a tiny model by hand, then writing and checking its manifest, with the README's own arguments."""
    target = tmp_path / "tiny"
    commands = {" ".join(arguments[:2]): arguments for arguments in _python_commands()}
    for key, placeholder in (("scripts/make_tiny_model.py --layout", "/tmp/tiny"),
                             ("scripts/fetch_weights.py --write-manifest", "/opt/z-image-turbo/weights"),
                             ("scripts/fetch_weights.py --verify", "/opt/z-image-turbo/weights")):
        arguments = [str(target) if word == placeholder else word for word in commands[key]]
        ran = subprocess.run([sys.executable, *arguments], cwd=PROJECT_DIR, capture_output=True, text=True,
                             timeout=300)
        assert ran.returncode == 0, f"{' '.join(arguments)}:\n{ran.stdout[-1000:]}{ran.stderr[-2000:]}"
    assert (target / "manifest.json").is_file()
