"""Shared fixtures: tiny models in both layouts (built once per run), a CPU engine, free loopback ports."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

import pipeline  # noqa: F401  (offline flags before any Hugging Face import)
from pipeline.engine import Engine
from pipeline.layouts import LayoutKind
from pipeline.loader import load_pipeline
from pipeline.random_model import write_random_model
from pipeline.requests import Limits

PROJECT_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = PROJECT_DIR / "test-artifacts"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[LayoutKind, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {layout: write_random_model(root / layout.value, layout) for layout in LayoutKind}


@pytest.fixture
def tiny_copy(tiny_models, tmp_path):
    """A private copy of a tiny model that a test may damage."""

    def copy(layout: LayoutKind) -> Path:
        target = tmp_path / f"copy-{layout.value}"
        shutil.copytree(tiny_models[layout], target)
        return target

    return copy


@pytest.fixture(scope="session")
def loaded_tiny(tiny_models):
    return load_pipeline(tiny_models[LayoutKind.SINGLE_FILE], torch.device("cpu"))


@pytest.fixture
def engine(loaded_tiny, tmp_path) -> Engine:
    loaded_tiny.pipe.transformer.set_attention_backend("native")
    return Engine(loaded_tiny, limits=Limits(max_h=1024, max_w=1024), output_dir=tmp_path / "outputs",
                  model_name="tiny test model", attention_choice="sdpa")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
