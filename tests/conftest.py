"""Shared fixtures: the tiny random model in the real weights layout, and a pipeline on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA, unless SYNCDIFFUSION_GPU_SMOKE=1 runs them on the CPU at
    the smoke sizes or scripts/gpu_check.py hands them the figures it measured."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or os.environ.get("SYNCDIFFUSION_GPU_SMOKE") == "1":
        return
    import torch

    from syncdiffusion.testing.gpu.plugin import FIGURES

    if torch.cuda.is_available() or config.stash.get(FIGURES, None) is not None:
        return
    skip = pytest.mark.skip(reason="needs CUDA (SYNCDIFFUSION_GPU_SMOKE=1: the CPU, smoke sizes)")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights folder holding the tiny SD2-shaped model and a random VGG16 trunk."""
    from syncdiffusion.models.tiny import make_tiny_weights

    out = tmp_path_factory.mktemp("weights")
    make_tiny_weights(out)
    return out


@pytest.fixture(scope="session")
def run_script() -> Callable[..., subprocess.CompletedProcess]:
    """Run `scripts/NAME` with `args` as a user would, in `cwd`, with `env` on top of this
    process's; the package is found at the repo root as an editable install would find it."""

    def run(name: str, *args: str, cwd: Path | None = None, **env: str):
        base = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / name), *args],
            cwd=cwd,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=1800,
        )

    return run


@pytest.fixture(scope="session")
def pipe(tiny_weights):
    """The pipeline on the tiny model, on the CPU in fp32 (where it must match the oracle)."""
    from syncdiffusion import SyncDiffusionPipeline

    return SyncDiffusionPipeline.from_pretrained(tiny_weights, device="cpu")


@pytest.fixture(scope="session")
def family_weights(tmp_path_factory) -> Path:
    """A weights folder holding tiny SD 1.x, SD 2.x 768 v-prediction and SDXL models."""
    from syncdiffusion.models.tiny import make_tiny_weights

    out = tmp_path_factory.mktemp("families")
    make_tiny_weights(out, ("sd1", "sd2-v", "sdxl"))
    return out


@pytest.fixture(scope="module")
def multidiffusion(tiny_weights):
    """diffusers' MultiDiffusion pipeline (`StableDiffusionPanoramaPipeline`) on the tiny model's
    own files: what an unsynced panorama is held to."""
    from diffusers import StableDiffusionPanoramaPipeline

    pipe = StableDiffusionPanoramaPipeline.from_pretrained(
        tiny_weights / "stable-diffusion-2-base",
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
