"""app.py's start, in a subprocess of its own (what it imports stays out of the test process)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import PROJECT_DIR


def test_matplotlib_where_installed_is_imported_during_the_start_not_by_the_first_request(tmp_path):
    # Gradio imports pyplot around every event where matplotlib is installed. A stand-in package records
    # which thread imports pyplot: the start's import-ui thread, so no request pays it.
    package = tmp_path / "site" / "matplotlib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pyplot.py").write_text(
        "import os, threading\n"
        "with open(os.environ['PYPLOT_IMPORTED_BY'], 'w') as f:\n"
        "    f.write(threading.current_thread().name)\n")
    record = tmp_path / "imported_by"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(PROJECT_DIR)]),
               PYPLOT_IMPORTED_BY=str(record))
    subprocess.run([sys.executable, "-c", "import app; app.import_ui_in_background(loads_here=True).join()"],
                   cwd=PROJECT_DIR, env=env, check=True, timeout=300)
    assert record.read_text() == "import-ui"
