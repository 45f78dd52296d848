"""pipeline/engine_spawn.py: an engine process started from a front that has imported nothing heavy."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import PROJECT_DIR


def test_an_engine_process_starts_without_torch_imported_in_the_front():
    """What lets app.py start its first engine process before its own seconds of imports."""
    script = ("import sys\n"
              "from pipeline.engine_spawn import spawn_engine_process\n"
              "spawned = spawn_engine_process()\n"
              "print(spawned.process.is_alive(), sorted({'torch', 'diffusers', 'gradio'} & set(sys.modules)))\n")
    ran = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60)
    assert ran.stdout.split("\n")[0] == "True []", ran.stdout + ran.stderr[-3000:]
