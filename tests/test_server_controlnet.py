"""The ControlNet model (predict_controlnet.py) through the real Cog HTTP server, with condition
images uploaded as a client sends them: good ones, and every kind of bad one."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from syncdiffusion.request.image_file import read_parameters
from syncdiffusion.testing.cog_server import CogServer, decode_image, decode_png

pytestmark = pytest.mark.server

CONTROLNET = "tiny-controlnet-sd2"
SMALL = {"prompt": "a skyline", "num_inference_steps": 1, "sync_threshold": 1, "seed": 3}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def edge_map(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((height, width)) > 0.9).astype(np.uint8) * 255)


def bomb_png(side: int = 100_000) -> bytes:
    """A few hundred bytes of PNG whose header declares `side` x `side` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * 1000)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from syncdiffusion.models.tiny import make_tiny_controlnet, make_tiny_weights

    weights = make_tiny_weights(tmp_path_factory.mktemp("weights"))
    make_tiny_controlnet(weights / "stable-diffusion-2-base", weights / "controlnet" / CONTROLNET)
    with CogServer(
        weights,
        predictor="predict_controlnet.py:Predictor",
        SYNCDIFFUSION_MODEL="stable-diffusion-2-base",
        SYNCDIFFUSION_CONTROLNET=CONTROLNET,
    ) as server:
        assert server.health()["status"] == "READY", server.logs()
        yield server


def test_an_edge_map_and_no_size_give_a_panorama_of_its_size(server, tmp_path):
    layout = edge_map(1030, 509)
    result = server.predict({**SMALL, "control_image": data_url(png(layout))})
    assert result["status"] == "succeeded", result
    assert decode_png(result["output"]).size == (1032, 512)
    assert "control_image is 1030x509; the panorama is 1032x512" in result["logs"]
    saved = tmp_path / "p.png"
    saved.write_bytes(decode_image(result["output"]))
    parameters = read_parameters(saved)
    assert parameters["controlnet"] == CONTROLNET
    assert (parameters["control_image"]["width"], parameters["control_image"]["height"]) == (
        1030,
        509,
    )


def _bad_images() -> dict[str, tuple[str, str]]:
    """Uploads that must fail naming control_image, and what the message says of each."""
    whole = png(edge_map(600, 512))
    sixteen_bit = io.BytesIO()
    Image.fromarray(np.zeros((512, 600), dtype=np.uint16)).save(sixteen_bit, format="PNG")
    return {
        "text": (data_url(b"not an image at all", "text/plain"), "not an image"),
        "truncated": (data_url(whole[: len(whole) // 2]), "cut short or damaged"),
        "16-bit": (data_url(sixteen_bit.getvalue()), "16 bits a pixel"),
        "palette": (data_url(png(edge_map(600, 512).convert("P"))), "colour palette"),
        "alpha": (data_url(png(edge_map(600, 512).convert("RGBA"))), "alpha channel"),
        "bomb": (data_url(bomb_png()), "100000x100000"),
    }


def test_every_bad_condition_image_fails_by_name_and_the_server_stays_ready(server):
    for kind, (url, said) in _bad_images().items():
        result = server.predict({**SMALL, "control_image": url})
        assert result["status"] == "failed", kind
        error = result["error"]
        assert "control_image must be" in error and said in error, (kind, error)
        assert "Traceback" not in error
    assert server.settled_status() == "READY"
    good = server.predict({**SMALL, "control_image": data_url(png(edge_map(512, 512)))})
    assert good["status"] == "succeeded", good


def test_the_condition_image_is_required(server):
    response = server.request(SMALL)
    assert response.status_code == 422
    assert "control_image" in response.text
