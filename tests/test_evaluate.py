"""scripts/evaluate.py: the paper's coherence metrics over a folder of panoramas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from evaluate import coherence, crops, gram
from PIL import Image

from syncdiffusion.pipeline import load_lpips
from syncdiffusion.weights import VGG16_RELPATH

ROOT = Path(__file__).resolve().parents[1]


def test_crops_are_512_at_stride_512():
    image = Image.new("RGB", (1600, 1100))
    tiles = crops(image)
    assert tiles.shape == (3 * 2, 3, 512, 512)


def test_gram_is_normalised():
    features = torch.ones(1, 2, 4, 4)
    assert torch.allclose(gram(features), torch.full((1, 2, 2), 1 / 2))


def test_a_repeated_tile_is_perfectly_coherent(tiny_weights):
    model = load_lpips(tiny_weights / VGG16_RELPATH)
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    repeated = Image.fromarray(np.concatenate([tile, tile], axis=1))
    n, intra_lpips, intra_style = coherence(model, repeated, torch.device("cpu"))
    assert n == 2 and intra_lpips < 1e-6 and intra_style < 1e-9
    mixed = Image.fromarray(np.concatenate([tile, 255 - tile], axis=1))
    _, mixed_lpips, mixed_style = coherence(model, mixed, torch.device("cpu"))
    assert mixed_lpips > intra_lpips and mixed_style > intra_style


def test_report_over_a_folder(tiny_weights, tmp_path):
    for i in range(2):
        Image.new("RGB", (1024, 512), (i * 100, 50, 50)).save(tmp_path / f"p{i}.png")
    result = subprocess.run(
        [sys.executable, "scripts/evaluate.py", str(tmp_path), "--weights", str(tiny_weights)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Intra-LPIPS" in result.stdout and "Intra-Style-L" in result.stdout
    assert "p0.png" in result.stdout and "mean of 2 images" in result.stdout
