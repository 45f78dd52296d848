"""deploy/supervisor/ray-node.conf: supervisor reads both blocks with the service's rules, and every `ray start`
option they use exists in the installed Ray."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from supervisor.datatypes import RestartUnconditionally, RestartWhenExitUnexpected
from supervisor.options import ServerOptions, UnhosedConfigParser

from tests.helpers import PROJECT_DIR

TEMPLATE = PROJECT_DIR / "deploy" / "supervisor" / "ray-node.conf"
RAY = Path(sys.executable).parent / "ray"


def _programs(tmp_path):
    text = TEMPLATE.read_text().format(ray=RAY, head_ip="10.0.0.1", log_dir=tmp_path)
    parser = UnhosedConfigParser()
    parser.read_string(text)
    options = ServerOptions()
    return {section.split(":", 1)[1]: options.processes_from_section(parser, section, section.split(":", 1)[1])[0]
            for section in parser.sections()}


def test_both_blocks_are_supervisor_programs_that_keep_their_process_group_and_log(tmp_path):
    programs = _programs(tmp_path)
    assert set(programs) == {"ray-head", "ray-worker"}
    head, worker = programs["ray-head"], programs["ray-worker"]
    assert head.autorestart is RestartWhenExitUnexpected
    assert worker.autorestart is RestartUnconditionally  # its head gone, it exits: start it again
    for program in (head, worker):
        assert program.stopasgroup and program.killasgroup
        assert "--block" in program.command.split()  # in the foreground: supervisor sees it end
        assert Path(program.stdout_logfile).parent == tmp_path
    assert "--address=10.0.0.1:6379" in worker.command and "--port=6379" in head.command


def test_every_ray_start_option_the_blocks_use_exists():
    pytest.importorskip("ray")
    help_text = subprocess.run([str(RAY), "start", "--help"], capture_output=True, text=True, timeout=120).stdout
    used = set(re.findall(r"(--[a-z-]+)", " ".join(
        line for line in TEMPLATE.read_text().splitlines() if line.startswith("command="))))
    assert used and all(re.search(rf"^\s+{option}\b", help_text, re.M) for option in used), used
