import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.attention import apply_backend
from pipeline.messages import StartupError, first_line

PROJECT_DIR = Path(__file__).resolve().parent.parent


def test_the_first_line_of_a_message_or_the_type_when_there_is_none():
    assert first_line(RuntimeError("CUDA error: an illegal memory access\nmore\nlines")) == \
        "CUDA error: an illegal memory access"
    assert first_line(RuntimeError("  \n  leading blank lines\nnext")) == "leading blank lines"
    assert first_line(OSError()) == "OSError"
    assert first_line(ValueError("   ")) == "ValueError"


def test_no_usable_attention_backend_is_a_start_up_error_naming_each_reason():
    class NoBackendWorks:
        def set_attention_backend(self, name):
            raise ImportError(f"{name} is not installed")

    with pytest.raises(StartupError, match="no attention backend is usable: native: native is not installed"):
        apply_backend(NoBackendWorks(), "sdpa", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_missing_device_ends_the_start_in_one_line_not_a_traceback(tmp_path):
    with socket.socket() as probe:  # a free port: the start must get past the port check to reach the device
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "app.py", "--demo", "--demo-dir", str(tmp_path / "demo"), "--device",
                             "cuda", "--port", str(port), "--output-dir", str(tmp_path / "outputs")],
                            cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot start: --device cuda was asked for, but PyTorch sees no CUDA GPU" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
