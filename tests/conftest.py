"""Shared fixtures: tiny models in both layouts (built once per run), the tiny pipeline loaded once, a CPU engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import pipeline  # noqa: F401  (offline flags before any Hugging Face import)
from pipeline.engine import Engine
from pipeline.layouts import LayoutKind
from pipeline.loader import load_pipeline
from pipeline.random_model import write_random_model
from tests.helpers import engine_options


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
    """Loaded once for the run and shared: a test that changes it (weights, attention backend, hooks) puts it back."""
    return load_pipeline(tiny_models[LayoutKind.SINGLE_FILE], torch.device("cpu"))


@pytest.fixture
def engine(loaded_tiny, tmp_path) -> Engine:
    return Engine(loaded_tiny, engine_options(tmp_path / "outputs"))
