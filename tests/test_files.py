"""Reproducible files: parameters travel inside PNG, WebP and JPEG files and come back out."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from syncdiffusion.request.image_file import model_identity, read_parameters, save_image

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


PANORAMA_360 = {"prompt": "a beach", "seed": 1, "loop_closure": True}
FORMATS = ["png", "webp", "jpg"]


RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
GPANO = "{http://ns.google.com/photos/1.0/panorama/}"


def _gpano(path):
    """The GPano fields of a file, read by Pillow's XMP parser (defusedxml's ElementTree)."""
    with Image.open(path) as saved:
        xmp = saved.getxmp(strip_namespaces=False)
    description = xmp["{adobe:ns:meta/}xmpmeta"][f"{RDF}RDF"][f"{RDF}Description"]
    return {k[len(GPANO) :]: v for k, v in description.items() if k.startswith(GPANO)}


@pytest.fixture
def notices():
    """What `save_image` logs, whatever an in-process Cog setup did to propagation."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("syncdiffusion.request.image_file")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("output_format", FORMATS)
@pytest.mark.parametrize(
    "width, height, full_height, band_height, top",
    [
        (2048, 512, 1024, 512, 256),  # 4:1, a band centred on the horizon
        (1024, 512, 512, 512, 0),  # 2:1, the whole sphere
        (512, 512, 256, 256, 0),  # square: taller than a sphere, declared the whole sphere
    ],
)
def test_360_files_carry_photo_sphere_xmp(
    tmp_path, notices, output_format, width, height, full_height, band_height, top
):
    image = Image.new("RGB", (width, height), (90, 120, 200))
    path = save_image(image, tmp_path / f"pano.{output_format}", PANORAMA_360, output_format)
    assert _gpano(path) == {
        "ProjectionType": "equirectangular",
        "UsePanoramaViewer": "True",
        "FullPanoWidthPixels": str(width),
        "FullPanoHeightPixels": str(full_height),
        "CroppedAreaImageWidthPixels": str(width),
        "CroppedAreaImageHeightPixels": str(band_height),
        "CroppedAreaLeftPixels": "0",
        "CroppedAreaTopPixels": str(top),
    }
    assert read_parameters(path) == PANORAMA_360  # the parameters stay beside the XMP
    too_tall = [notice for notice in notices if "cannot be a band" in notice]
    if height > width // 2:
        assert too_tall == [
            f"a 360-degree panorama {width}x{height} is taller than half its width, so it "
            f"cannot be a band of a sphere; its metadata declares the whole sphere "
            f"({width}x{full_height}), so viewers squeeze it vertically by a factor of 2.00; "
            f"a height of at most {full_height} keeps its proportions"
        ]
    else:
        assert too_tall == []


@pytest.mark.parametrize("output_format", FORMATS)
def test_flat_files_carry_no_photo_sphere_xmp(tmp_path, output_format):
    parameters = {**PANORAMA_360, "loop_closure": False}
    path = save_image(Image.new("RGB", (1024, 512)), tmp_path / f"p.{output_format}", parameters)
    with Image.open(path) as saved:
        assert "xmp" not in saved.info


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_100_kb_prompt_saves_in_every_format(tmp_path, notices, output_format):
    prompt = "ä red fox in the snow, " * 4500  # 103,500 characters, past JPEG's 64 KB segments
    parameters = {**PANORAMA_360, "prompt": prompt, "negative_prompt": "\ud800 blurry"}
    path = save_image(
        Image.new("RGB", (1024, 512)), tmp_path / f"p.{output_format}", parameters, output_format
    )
    saved = read_parameters(path)
    assert _gpano(path)["FullPanoWidthPixels"] == "1024"
    if output_format == "jpg":
        kept = len(saved["prompt"])
        assert 10_000 < kept < len(prompt) and prompt.startswith(saved["prompt"])
        assert saved["negative_prompt"] == parameters["negative_prompt"]
        assert notices == [
            f"the jpg file keeps the first {kept} of {len(prompt)} characters of prompt: its "
            "metadata holds at most 64 KB (the text encoder reads only the first 77 tokens)"
        ]
    else:
        assert saved == parameters
        assert notices == []
