"""Reproducible files: parameters travel inside PNG, WebP and JPEG files and come back out."""

from __future__ import annotations

import pytest
from PIL import Image

from syncdiffusion.files import model_identity, read_parameters, save_image

PARAMETERS = {
    "prompt": "a fjord, ünïcode",
    "width": 1024,
    "seed": 2**63,
    "loop_closure": True,
    "guidance_scale": 7.5,
}


@pytest.mark.parametrize(
    "output_format, pil_format", [("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")]
)
def test_parameters_round_trip(tmp_path, output_format, pil_format):
    image = Image.new("RGB", (64, 32), (10, 200, 30))
    path = save_image(image, tmp_path / f"pano.{output_format}", PARAMETERS, output_format, 90)
    with Image.open(path) as saved:
        assert saved.format == pil_format
        assert saved.size == (64, 32)
    assert read_parameters(path) == PARAMETERS


def test_png_has_one_text_chunk_per_input(tmp_path):
    path = save_image(Image.new("RGB", (8, 8)), tmp_path / "p.png", PARAMETERS)
    with Image.open(path) as saved:
        assert saved.text["prompt"] == "a fjord, ünïcode"
        assert saved.text["seed"] == str(2**63)


def test_a_file_without_parameters_is_refused_by_name(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match=r"plain\.png carries no SyncDiffusion parameters"):
        read_parameters(path)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match=r"output_format must be one of png, webp, jpg; got 'gif'"):
        save_image(Image.new("RGB", (8, 8)), "x.gif", {}, "gif")


def test_model_identity_ignores_bookkeeping_keys():
    config = {"in_channels": 4, "block_out_channels": [320, 640]}
    assert model_identity(config) == model_identity({**config, "_diffusers_version": "0.42"})
    assert model_identity(config) != model_identity({**config, "in_channels": 9})
