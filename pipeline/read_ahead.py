"""The single weight files (layout A) read onto their devices while the process is still importing its libraries.

A start spends ~15 s importing diffusers, transformers and gradio, pure Python that holds the interpreter, and then
seconds reading 20 GB of weights onto the GPU: file reads and copies that release it. Begun as soon as torch is
imported, the reads overlap the imports instead of following them, and the loader builds the modules from tensors
already in place (docs/PERFORMANCE.md, "Where a restart's seconds go"). Written by hand: diffusers and
transformers load weights only once they are imported themselves.

Nothing here judges the files. A read that fails is forgotten, and the loader reads that file itself, so a missing
or broken file is reported exactly as without read-ahead.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file  # here, in the importing thread, not first in the reading one

from pipeline.layouts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE


class ReadAhead:
    """Reads each file into a state dict on its device, one after another in one background thread (the largest
    first: the loader needs it first)."""

    def __init__(self, files: dict[Path, torch.device]):
        self._files = files
        self._results: dict[Path, dict[str, torch.Tensor] | None] = {}
        self._done = {path: threading.Event() for path in files}  # read, or failed
        self.seconds: dict[Path, float] = {}
        threading.Thread(target=self._read_all, name="read-ahead", daemon=True).start()

    @classmethod
    def of_model(cls, model_dir: Path, device: torch.device) -> ReadAhead | None:
        """Read-ahead for `model_dir`'s single files, or None when it holds none (layout B, which diffusers reads
        shard by shard, or no weights at all: the loader says what is wrong). The text encoder's file goes to CPU
        memory on every device: transformers builds a model from a state dict there (given a device_map instead,
        it would first reserve the model's size once more on the GPU, past a memory cap), and the loader moves it
        afterwards, as without read-ahead."""
        files = {model_dir / DIT_FILE: device, model_dir / TEXT_ENCODER_FILE: torch.device("cpu"),
                 model_dir / VAE_FILE: device}
        if not all(path.is_file() for path in files):
            return None
        return cls(files)

    def _read_all(self) -> None:
        for path, device in self._files.items():
            started = time.perf_counter()
            try:
                self._results[path] = load_file(path, device=str(device))
            except Exception:  # the loader reads the file itself and reports the problem with its own words
                pass
            finally:
                self.seconds[path] = time.perf_counter() - started
                self._done[path].set()

    def take(self, path: Path) -> dict[str, torch.Tensor] | None:
        """`path`'s tensors, once read (waiting for them), handed over once; None when it was not read ahead or the
        read failed."""
        done = self._done.get(path)
        if done is None:
            return None
        done.wait()
        return self._results.pop(path, None)
