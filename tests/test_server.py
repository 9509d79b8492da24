"""The model through the real Cog HTTP server (coglet), as `cog predict` and Replicate run it."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from syncdiffusion.replicate.schema import published_inputs
from syncdiffusion.request.image_file import read_parameters
from syncdiffusion.testing.cog_server import (
    CogServer,
    decode_image,
    decode_png,
    new_prediction_id,
    soak,
    verdict,
)

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


@pytest.fixture(scope="module")
def server(tiny_weights):
    with CogServer(tiny_weights) as server:
        assert server.health()["status"] == "READY", server.logs()
        yield server


def test_health_check_is_ready_and_setup_logs_are_clean(server):
    logs = server.health()["setup"]["logs"]
    assert "deprecated" not in logs.lower()
    assert "LPIPS" not in logs
    assert "accelerate" not in logs


def test_prediction_returns_a_png_of_the_asked_size(server):
    result = server.predict(SMALL)
    assert result["status"] == "succeeded", result
    image = decode_png(result["output"])
    assert image.format == "PNG"
    assert image.size == (768, 512)
    assert "Using seed: 5" in result["logs"]
    assert "step 2/2" in result["logs"]


def test_a_sync_weight_of_zero_runs_no_sync_step(server):
    synced = server.predict({**SMALL, "sync_threshold": 2})
    assert re.search(r"^step 1/2 sync ", synced["logs"], re.MULTILINE), synced["logs"]
    plain = server.predict({**SMALL, "sync_threshold": 2, "sync_weight": 0})
    assert plain["status"] == "succeeded", plain
    assert " sync " not in plain["logs"] and "step 2/2" in plain["logs"]


def test_bad_input_fails_naming_it_and_the_server_carries_on(server):
    result = server.predict({**SMALL, "width": 700})
    assert result["status"] == "failed"
    assert "width must be a multiple of 8 from 512 to 4096" in result["error"]
    assert "700" in result["error"]
    assert server.settled_status() == "READY"
    assert server.predict(SMALL)["status"] == "succeeded"


# Inputs the published schema allows but the model refuses: its rules that a schema cannot state.
BAD_INPUTS = [
    ({"width": 700}, "width must be a multiple of 8 from 512 to 4096", "700"),
    (
        {
            "width": 4096,
            "height": 4096,
            "stride": 8,
            "num_inference_steps": 200,
            "sync_threshold": 50,
        },
        "SD2-base window-steps, and the limit is 1,029,315",
        "4096x4096",
    ),
    ({"stride": 12}, "stride must be a multiple of 8 from 8 to 56", "12"),
    # JSON numbers past 2**63 reach the model as floats.
    ({"seed": 2**64}, "seed must be an integer from 0", "1.8446744073709552e+19"),
]

# Inputs the server refuses by the schema `cog build` publishes, before the model sees them.
REFUSED_INPUTS = [
    {"width": 5000},
    {"width": "wide"},
    {"width": 100000},
    {"height": 384},
    {"guidance_scale": 25},
    {"guidance_scale": "high"},
    {"sync_weight": -1},
    {"sync_decay_rate": 1.5},
    {"sync_freq": 0},
    {"sync_threshold": 51},
    {"num_inference_steps": 0},
    {"num_inference_steps": 201},
    {"stride": 64},
    {"seed": -1},
    {"seed": 1.5},
    {"loop_closure": "yes"},
    {"prompt": 5},
    {"prompt": "x" * 10_001},
    {"negative_prompt": "x" * 10_001},
    {"output_format": "gif"},
    {"output_quality": 0},
]


def test_every_bad_input_fails_by_name_and_the_server_stays_ready(server):
    for change, message, value in BAD_INPUTS:
        result = server.predict({**SMALL, **change})
        assert result["status"] == "failed", change
        assert message in result["error"] and value in result["error"], (change, result["error"])
        assert "Traceback" not in result["error"]
    assert server.settled_status() == "READY"
    assert server.predict(SMALL)["status"] == "succeeded"


def test_the_schema_refuses_what_it_publishes_as_out_of_bounds_by_name(server):
    for change in REFUSED_INPUTS:
        response = server.request({**SMALL, **change})
        assert response.status_code == 422, (change, response.text)
        [(name, _)] = change.items()
        assert [e["loc"] for e in response.json()["detail"]] == [["body", "input", name]], change
    missing = server.request({k: v for k, v in SMALL.items() if k != "prompt"})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "input", "prompt"]
    assert server.settled_status() == "READY"


def test_an_unknown_input_is_dropped_as_in_a_deployed_image(server):
    result = server.predict({**SMALL, "colour": "red"})
    assert result["status"] == "succeeded", result


def test_openapi_json_is_the_published_schema(server):
    response = server.openapi()
    assert response.status_code == 200, response.text
    properties = response.json()["components"]["schemas"]["Input"]["properties"]
    # coglet serves the document with its keys sorted; x-order keeps the signature's order.
    in_order = sorted(properties, key=lambda name: properties[name]["x-order"])
    assert in_order == list(published_inputs(ROOT / "predict.py"))
    assert properties["width"]["maximum"] == 4096
    assert '"\n' not in properties["sync_weight"]["description"]
    assert "Running without schema" not in server.logs()


def test_empty_and_overlong_prompts_are_accepted(server):
    for prompt in ("", "   "):
        assert server.predict({**SMALL, "prompt": prompt})["status"] == "succeeded"
    result = server.predict({**SMALL, "prompt": "a very long prompt " * 40})
    assert result["status"] == "succeeded", result
    assert re.search(
        r"^prompt is more than 77 tokens long; the text encoder reads the first 77$",
        result["logs"],
        re.MULTILINE,
    ), result["logs"]
    assert "Token indices" not in result["logs"]  # one line, not the tokenizer's warning too


def test_the_longest_prompts_save_as_a_photo_sphere_in_every_format(server, tmp_path):
    # The longest texts the schema takes, in CJK: as JSON (\u escapes) they outgrow a JPEG's
    # 64 KB of EXIF.
    prompt, negative = ("悬崖上的灯塔，" * 1500)[:10_000], "模糊" * 5000
    request = {
        **SMALL,
        "prompt": prompt,
        "negative_prompt": negative,
        "width": 512,
        "num_inference_steps": 1,
        "sync_threshold": 0,
        "loop_closure": True,
    }
    for output_format, pil_format in (("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")):
        result = server.predict({**request, "output_format": output_format})
        assert result["status"] == "succeeded", result
        path = tmp_path / f"pano.{output_format}"
        path.write_bytes(decode_image(result["output"]))
        with Image.open(path) as image:
            assert image.format == pil_format and image.size == (512, 512)
            sphere = image.getxmp()["xmpmeta"]["RDF"]["Description"]
        assert sphere["ProjectionType"] == "equirectangular"
        assert (sphere["FullPanoWidthPixels"], sphere["FullPanoHeightPixels"]) == ("512", "256")
        assert "a 360-degree panorama 512x512 is taller than half its width" in result["logs"]
        saved = read_parameters(path)
        assert saved["loop_closure"] is True and saved["seed"] == SMALL["seed"]
        if output_format == "jpg":
            assert prompt.startswith(saved["prompt"]) and len(saved["prompt"]) > 4000
            assert re.search(
                r"^the jpg file keeps the first \d+ of 10000 characters of prompt",
                result["logs"],
                re.MULTILINE,
            ), result["logs"]
        else:
            assert (saved["prompt"], saved["negative_prompt"]) == (prompt, negative)


def test_the_same_request_gives_the_same_pixels_whatever_ran_between(server):
    first = decode_png(server.predict(SMALL)["output"]).tobytes()
    server.predict({**SMALL, "seed": 99, "width": 512, "guidance_scale": 3.0})
    server.predict({**SMALL, "width": 700})  # a failure in between changes nothing either
    assert decode_png(server.predict(SMALL)["output"]).tobytes() == first


def test_cancel_ends_a_long_prediction_and_the_next_is_as_fresh(server):
    reference = decode_png(server.predict(SMALL)["output"]).tobytes()
    rss_before = server.worker_rss()
    long = {**SMALL, "num_inference_steps": 200, "sync_threshold": 0}
    prediction_id, result = new_prediction_id(), {}
    runner = threading.Thread(
        target=lambda: result.update(server.predict(long, prediction_id=prediction_id))
    )
    runner.start()
    time.sleep(8)  # well into the denoising loop (about 0.3 s a step here)
    cancelled_at = time.monotonic()
    assert server.cancel(prediction_id).status_code == 200
    runner.join(120)
    assert not runner.is_alive(), "the cancelled prediction did not end"
    assert result["status"] == "canceled", result
    # Cancellation lands between two Python-level calls, well within one denoising step; the
    # bound is loose so that a loaded machine cannot fail it.
    assert time.monotonic() - cancelled_at < 10
    assert server.settled_status() == "READY"
    assert server.worker_rss() <= rss_before * 1.10
    assert decode_png(server.predict(SMALL)["output"]).tobytes() == reference


def test_five_in_a_row_hold_memory_steady(server):
    runs = soak(server, 5, SMALL)
    growth, _ = verdict(runs)  # time drift is for scripts/soak.py to judge, not a test
    assert growth <= 0.10, runs


def _truncate_unet(weights):
    unet = next((weights / "stable-diffusion-2-base" / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    return unet


@pytest.mark.parametrize(
    "breakage, named",
    [
        (lambda w: shutil.rmtree(w / "stable-diffusion-2-base" / "vae"), "vae"),
        (_truncate_unet, "truncated"),
    ],
)
def test_broken_weights_fail_setup_with_one_clear_message(tiny_weights, tmp_path, breakage, named):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    breakage(weights)
    with CogServer(weights, HF_HUB_OFFLINE="1") as server:
        health = server.health()
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert str(weights) in logs and named in logs
    assert "python scripts/download_weights.py" in logs
    assert "Traceback" not in logs and "Traceback" not in server.logs()


def _data_url(image: Image.Image | bytes, mime: str = "image/png") -> str:
    import base64
    import io

    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


def test_a_photo_in_and_every_bad_image_or_mask_fails_by_name(server):
    photo = Image.new("RGB", (256, 256), (60, 110, 170))
    made = server.predict({**SMALL, "image": _data_url(photo), "prompt_strength": 1.0})
    assert made["status"] == "succeeded", made
    assert "placed in the middle" in made["logs"]  # an outpainting: another shape than 768x512
    saved_path = Path(server.workdir) / "made.png"
    saved_path.write_bytes(decode_image(made["output"]))
    assert read_parameters(saved_path)["image"]["width"] == 256
    colours = Image.new("RGB", (768, 512), (255, 0, 0))
    bad = [
        ({"image": _data_url(b"not an image", "text/plain")}, "image must be", "not an image"),
        ({"image": _data_url(photo.convert("RGBA"))}, "image must be", "alpha channel"),
        ({"mask": _data_url(Image.new("L", (768, 512)))}, "mask needs image", ""),
        ({"image": _data_url(photo), "mask": _data_url(colours)}, "mask must be one channel", ""),
        ({"image": _data_url(photo), "prompt_strength": 0.1}, "prompt_strength 0.1", "runs no"),
    ]
    for change, message, detail in bad:
        result = server.predict({**SMALL, **change})
        assert result["status"] == "failed", change.keys()
        assert message in result["error"] and detail in result["error"], result["error"]
        assert "Traceback" not in result["error"]
    assert server.settled_status() == "READY"
    assert server.predict(SMALL)["status"] == "succeeded"
