"""The model through the real Cog HTTP server (coglet), as `cog predict` and Replicate run it."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "prompt": "a desert canyon",
    "width": 768,
    "height": 512,
    "num_inference_steps": 2,
    "sync_threshold": 1,
    "seed": 5,
}

pytestmark = pytest.mark.server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    """`python -m cog.server.http` from the project root, serving predict.py on the tiny model."""
    port = _free_port()
    env = {
        **os.environ,
        "SYNCDIFFUSION_WEIGHTS": str(tiny_weights),
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        # coglet starts its worker with a bare `python`: this environment's must come first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "the server exited during setup"
            try:
                health = requests.get(f"{url}/health-check", timeout=5).json()
            except requests.ConnectionError:
                health = {}
            if health.get("status") == "READY":
                break
            assert health.get("status") != "SETUP_FAILED", health
            assert time.monotonic() < deadline, "the server was not READY in time"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.seek(0)
        print(log.read()[-5000:])
        log.close()


def predict(url: str, inputs: dict) -> dict:
    response = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


def decode_png(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix), data_url[:50]
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))


def test_health_check_is_ready_and_setup_logs_are_clean(server):
    health = requests.get(f"{server}/health-check", timeout=5).json()
    assert health["status"] == "READY"
    logs = health["setup"]["logs"]
    assert "deprecated" not in logs.lower()
    assert "LPIPS" not in logs


def test_prediction_returns_a_png_of_the_asked_size(server):
    result = predict(server, SMALL)
    assert result["status"] == "succeeded", result
    image = decode_png(result["output"])
    assert image.format == "PNG"
    assert image.size == (768, 512)
    assert "Using seed: 5" in result["logs"]


def test_bad_input_fails_naming_it_and_the_server_carries_on(server):
    result = predict(server, {**SMALL, "width": 700})
    assert result["status"] == "failed"
    assert "width must be a multiple of 128" in result["error"]
    assert "700" in result["error"]
    assert requests.get(f"{server}/health-check", timeout=5).json()["status"] == "READY"
    assert predict(server, SMALL)["status"] == "succeeded"
