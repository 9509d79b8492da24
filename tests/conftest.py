"""Shared fixtures: the tiny random model in the real weights layout, and a pipeline on it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights folder holding the tiny SD2-shaped model and a random VGG16 trunk."""
    out = tmp_path_factory.mktemp("weights")
    _load_script("make_tiny_weights").make_tiny_weights(out)
    return out


@pytest.fixture(scope="session")
def pipe(tiny_weights):
    """The pipeline on the tiny model, on the CPU in fp32 (where it must match the oracle)."""
    from syncdiffusion import SyncDiffusionPipeline

    return SyncDiffusionPipeline.from_pretrained(tiny_weights, device="cpu")
