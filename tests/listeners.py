"""Load the supervisor event listeners (programs in deploy/supervisor/, not a package) as modules for tests."""

import importlib.util
import sys

from tests.conftest import PROJECT_DIR


def load(name: str):
    path = PROJECT_DIR / "deploy" / "supervisor" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"listener_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
