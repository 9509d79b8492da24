"""LoRAs through the real Cog HTTP server: one fetched from an https URL once, cached and fused;
every hostile or wrong one refused before any work with a message naming the input, the server
up after each and the next panorama the base model's to the bit.

The LoRAs come from an HTTPS server this test starts on loopback, which the Cog server is told
to allow (SYNCDIFFUSION_LORA_ALLOWED_HOSTS) and to trust (SSL_CERT_FILE): the test alone does.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from syncdiffusion import SyncDiffusionPipeline
from syncdiffusion.testing.cog_server import CogServer, decode_image
from syncdiffusion.testing.https_server import HttpsServer
from syncdiffusion.testing.lora import make_lora

pytestmark = pytest.mark.server

SMALL = {
    "prompt": "a harbour",
    "width": 576,
    "height": 512,
    "num_inference_steps": 1,
    "sync_threshold": 0,
    "seed": 4,
}
CAP = 1 << 20  # bytes of a LoRA this server takes; the tiny model's are some kilobytes


class _Marker:
    """A pickle that would leave a file behind if anything unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def files(tiny_weights, family_weights, tmp_path_factory):
    """The LoRA files the HTTPS server serves, by name, and a weights folder of the tiny model
    with a LoRA cache of its own."""
    folder = tmp_path_factory.mktemp("lora-files")
    weights = tmp_path_factory.mktemp("lora-weights")
    for part in tiny_weights.iterdir():
        if part.name != "lora":
            (weights / part.name).symlink_to(part)
    sd2 = SyncDiffusionPipeline.from_pretrained(tiny_weights, device="cpu")
    sdxl = SyncDiffusionPipeline.from_pretrained(family_weights, device="cpu", model="tiny-sdxl")
    good = make_lora({"unet": sd2.unet, "text_encoder": sd2.text_encoder}, folder / "good")
    xl = make_lora({"unet": sdxl.unet, "text_encoder_2": sdxl.text_encoder_2}, folder / "xl")
    data = good.read_bytes()
    ckpt = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    marker = folder / "unpickled"
    served = {
        "/good.safetensors": data,
        "/xl.safetensors": xl.read_bytes(),
        "/truncated.safetensors": data[: len(data) // 2],
        "/model.ckpt": ckpt.getvalue(),
        "/evil.safetensors": pickle.dumps(_Marker(str(marker))),
        "/huge.safetensors": data + b"\0" * CAP,
    }
    return weights, served, marker


@pytest.fixture(scope="module")
def https(files):
    _, served, _ = files
    with HttpsServer() as server:
        for path, body in served.items():
            server.serve(path, body)
        server.serve("/stalled.safetensors", served["/good.safetensors"], stall=60, stall_after=8)
        server.redirect("/to-http", "http://127.0.0.1/good.safetensors")
        yield server


@pytest.fixture(scope="module")
def server(files, https):
    weights, _, _ = files
    with CogServer(
        weights,
        SSL_CERT_FILE=str(https.ca_file),
        SYNCDIFFUSION_LORA_ALLOWED_HOSTS="127.0.0.1",
        SYNCDIFFUSION_LORA_TIMEOUT="2",
        SYNCDIFFUSION_LORA_MAX_BYTES=str(CAP),
    ) as server:
        assert server.health()["status"] == "READY", server.logs()
        yield server


@pytest.fixture(scope="module")
def plain(server):
    """The panorama without a LoRA, before any LoRA request."""
    result = server.predict(SMALL)
    assert result["status"] == "succeeded", result
    return decode_image(result["output"])


def test_a_lora_from_an_https_url_is_fetched_once_and_fused(server, https, plain):
    url = https.url("/good.safetensors")
    first = server.predict({**SMALL, "lora_weights": url, "lora_scale": 0.8})
    assert first["status"] == "succeeded", first
    assert decode_image(first["output"]) != plain
    again = server.predict({**SMALL, "lora_weights": url, "lora_scale": 0.8})
    assert decode_image(again["output"]) == decode_image(first["output"])
    assert https.requests["/good.safetensors"] == 1  # the second came from weights/lora/
    # The next panorama without one is the base model's, to the bit.
    assert decode_image(server.predict(SMALL)["output"]) == plain


# (input, path on the HTTPS server or a whole URL, what the refusal says)
REFUSED = [
    ("lora_weights", "http://127.0.0.1/good.safetensors", "must be an https:// URL"),
    ("lora_weights", "/to-http", "http://"),
    ("extra_lora", "https://10.1.2.3/good.safetensors", "10.1.2.3"),
    ("lora_weights", "https://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("lora_weights", "localhost", "own network"),
    ("lora_weights", "/etc/passwd", "does not read local files"),
    ("lora_weights", "/huge.safetensors", f"more than the {CAP:,} a LoRA may be here"),
    ("lora_weights", "/truncated.safetensors", "truncated"),
    ("extra_lora", "/model.ckpt", "pickle"),
    ("lora_weights", "/evil.safetensors", "pickle"),
    ("lora_weights", "/stalled.safetensors", "timed out"),
    ("lora_weights", "/xl.safetensors", "another model family"),
    ("lora_weights", "/missing.safetensors", "404"),
]


@pytest.mark.parametrize(("name", "where", "says"), REFUSED, ids=[r[1] for r in REFUSED])
def test_a_bad_lora_fails_naming_it_and_the_server_carries_on(
    server, https, files, plain, name, where, says
):
    if where == "localhost":
        source = https.url("/good.safetensors", host="localhost")
    elif where.startswith("/") and where != "/etc/passwd":
        source = https.url(where)
    else:
        source = where
    result = server.predict({**SMALL, name: source})
    assert result["status"] == "failed", result
    assert f"{name} {source!r}" in result["error"], result["error"]
    assert says in result["error"], result["error"]
    assert "Traceback" not in result["error"]
    assert server.settled_status() == "READY"
    assert not files[2].exists()  # nothing was unpickled
    assert decode_image(server.predict(SMALL)["output"]) == plain
