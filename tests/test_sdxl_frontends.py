"""SDXL through the command line, the SDXL Cog predictor's static schema and the Cog server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from syncdiffusion.models.tiny import TINY_MODELS
from syncdiffusion.request.image_file import read_parameters
from syncdiffusion.testing.cog_server import CogServer, decode_png

ROOT = Path(__file__).resolve().parents[1]
SDXL = TINY_MODELS["sdxl"][0]


def test_cli_makes_an_sdxl_panorama(family_weights, tmp_path):
    out = tmp_path / "pano.png"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "syncdiffusion", "--prompt", "a fjord", "--output", str(out)),
            *("--weights", str(family_weights), "--model", SDXL, "--width", "320"),
            *("--height", "256", "--stride", "8", "--num-inference-steps", "2"),
            *("--sync-threshold", "1"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (320, 256)
    assert read_parameters(out)["width"] == 320


@pytest.mark.server
def test_cog_server_serves_the_sdxl_predictor(family_weights):
    sdxl = {"predictor": "predict_sdxl.py:Predictor", "SYNCDIFFUSION_MODEL": SDXL}
    with CogServer(family_weights, **sdxl) as server:
        assert server.health()["status"] == "READY", server.logs()
        small = {"prompt": "a fjord", "width": 1024, "height": 1024, "stride": 24}
        small |= {"num_inference_steps": 2, "sync_threshold": 0, "seed": 5}
        result = server.predict(small)
        assert result["status"] == "succeeded", result
        assert decode_png(result["output"]).size == (1024, 1024)
        # The schema's stride bound is the real SDXL's; the model's own window sets the rule.
        refused = server.predict({**small, "stride": 32})
        assert refused["status"] == "failed"
        rule = "stride must be a multiple of 8 from 8 to 24 (less than the 32-latent"
        assert rule in refused["error"]
