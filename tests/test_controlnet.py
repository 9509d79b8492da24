"""Layout control: the pipeline with a ControlNet against the authors' SyncControlNet (the
oracle), the condition image's crops, the control inputs, and the ControlNets that fit.

The tiny ControlNets have random zero convolutions (`make_tiny_controlnet`), so their
residuals change the picture and a parity test can fail.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from syncdiffusion import InputError, SyncDiffusionPipeline, WeightsError
from syncdiffusion.core.control import Control, image_record
from syncdiffusion.core.windows import Geometry, Window
from syncdiffusion.request.cost import LIMIT, request_cost
from syncdiffusion.request.image_file import read_parameters, save_image
from syncdiffusion.request.inputs import panorama_request, panorama_size
from syncdiffusion.testing.oracle_controlnet import oracle_sync_controlnet

SD2_CONTROLNET, SDXL_CONTROLNET = "tiny-controlnet-sd2", "tiny-controlnet-sdxl"
SMALL = dict(
    prompt="a city skyline at night",
    negative_prompt="blurry",
    width=640,
    height=512,
    num_inference_steps=2,
    sync_threshold=1,
    seed=7,
)


@pytest.fixture(scope="module")
def control_weights(tmp_path_factory):
    """A weights folder with the tiny SD2-shaped and SDXL models and a tiny ControlNet of each."""
    from syncdiffusion.models.tiny import make_tiny_controlnet, make_tiny_weights

    out = tmp_path_factory.mktemp("control-weights")
    make_tiny_weights(out, ("sd2", "sdxl"))
    make_tiny_controlnet(out / "stable-diffusion-2-base", out / "controlnet" / SD2_CONTROLNET)
    make_tiny_controlnet(out / "tiny-sdxl", out / "controlnet" / SDXL_CONTROLNET)
    return out


@pytest.fixture(scope="module")
def cpipe(control_weights):
    return SyncDiffusionPipeline.from_pretrained(
        control_weights, device="cpu", controlnet=SD2_CONTROLNET
    )


@pytest.fixture(scope="module")
def layout():
    """An edge-map-like condition image of another size than the panorama (it is resized)."""
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((300, 700, 3)) > 0.8).astype(np.uint8) * 255)


CASES = {
    "defaults": {},
    "scale_and_window": dict(
        num_inference_steps=3,
        controlnet_conditioning_scale=0.5,
        control_guidance_start=0.34,
        control_guidance_end=0.9,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_equals_the_authors_sync_controlnet(cpipe, layout, case):
    """On the CPU in fp32: latents to float rounding, pixels within 2/255 (our final decode
    multiplies by 1/s where theirs divides by s: one rounding apart)."""
    inputs = {**SMALL, **CASES[case]}
    expected_image, expected_latent = oracle_sync_controlnet(cpipe, layout, **inputs)
    latent = cpipe(control_image=layout, output_type="latent", **inputs)
    assert torch.allclose(latent, expected_latent, atol=5e-4, rtol=0), (
        (latent - expected_latent).abs().max()
    )
    image = cpipe.decode(latent)
    assert image.size == expected_image.size == (640, 512)
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(expected_image, dtype=int))
    assert difference.max() <= 2


@pytest.mark.parametrize(
    "off", [dict(controlnet_conditioning_scale=0.0), dict(control_guidance_start=0.9)]
)
def test_a_controlnet_that_never_steers_gives_the_plain_panorama(
    control_weights, cpipe, layout, off
):
    inputs = {**SMALL, "num_inference_steps": 1}
    plain = SyncDiffusionPipeline.from_pretrained(control_weights, device="cpu")
    expected = plain(**inputs, output_type="latent")
    assert torch.equal(cpipe(control_image=layout, **off, **inputs, output_type="latent"), expected)
    steered = cpipe(control_image=layout, **inputs, output_type="latent")
    assert (steered - expected).abs().max() > 1e-2


def test_each_window_takes_its_crop_and_wrap_windows_take_theirs_across_the_seam():
    # A latent 4 high and 8 wide at 2 image pixels per latent pixel; windows of 4.
    image = torch.arange(2 * 8 * 16, dtype=torch.float32).reshape(1, 2, 8, 16)
    windows = [Window(0, 4, 0, 4), Window(0, 4, 4, 8), Window(0, 4, 6, 2)]
    control = Control(None, image, windows, vae_scale_factor=2)
    crops = control.crops([1, 2])
    assert torch.equal(crops[0], image[0, :, 0:8, 8:16])
    assert torch.equal(crops[1], torch.cat([image[0, :, 0:8, 12:], image[0, :, 0:8, :4]], -1))
    assert crops.shape == (2, 2, 8, 8)


def test_the_controlnet_steers_the_steps_between_start_and_end_as_diffusers_does():
    for start, end in [(0.0, 1.0), (0.2, 0.8), (0.5, 0.6), (0.0, 0.1)]:
        control = Control(None, torch.zeros(1), [], 8, scale=1.5, start=start, end=end)
        for steps in (1, 7, 50):
            for i in range(steps):
                keep = 1.0 - float(i / steps < start or (i + 1) / steps > end)
                assert control.scale_at(i, steps) == 1.5 * keep


def test_a_360_panorama_with_a_layout(cpipe, layout):
    image = cpipe(control_image=layout, loop_closure=True, **{**SMALL, "sync_threshold": 0})
    assert image.size == (640, 512)


def test_a_controlnet_steers_under_another_scheduler(cpipe, layout):
    inputs = {**SMALL, "scheduler": "KarrasDPM", "output_type": "latent"}
    steered = cpipe(control_image=layout, **inputs)
    unsteered = cpipe(control_image=layout, controlnet_conditioning_scale=0.0, **inputs)
    assert steered.isfinite().all() and not torch.equal(steered, unsteered)


def test_the_control_inputs_are_checked_by_name(cpipe, layout):
    with pytest.raises(InputError, match="control_image is required"):
        cpipe.request(prompt="x")
    with pytest.raises(InputError, match=r"control_image must be an image; got 'edges.png'"):
        cpipe.request(prompt="x", control_image="edges.png")
    with pytest.raises(InputError, match="controlnet_conditioning_scale must be a number from 0"):
        cpipe.request(prompt="x", control_image=layout, controlnet_conditioning_scale=2.5)
    with pytest.raises(
        InputError, match=r"control_guidance_start must be below control_guidance_end; got 0.5 and"
    ):
        cpipe.request(
            prompt="x", control_image=layout, control_guidance_start=0.5, control_guidance_end=0.5
        )
    with pytest.raises(InputError, match=r"width must be 0 \(the control image's\) or a multiple"):
        cpipe.request(prompt="x", control_image=layout, width=256)


def test_without_a_size_the_panorama_takes_the_condition_image_s(cpipe, caplog):
    image = Image.new("RGB", (3070, 509))
    with caplog.at_level(logging.INFO, logger="syncdiffusion"):
        request = cpipe.request(prompt="x", control_image=image)
    width, height, note = panorama_size(image, cpipe.geometry)
    assert (request["width"], request["height"]) == (width, height) == (3072, 512)
    assert note in caplog.text
    exact = cpipe.request(prompt="x", control_image=Image.new("RGB", (3072, 512)), height=768)
    assert (exact["width"], exact["height"]) == (3072, 768)


def test_the_file_names_the_controlnet_and_the_condition_image(cpipe, layout, tmp_path):
    image = cpipe(control_image=layout, **{**SMALL, "num_inference_steps": 1, "sync_threshold": 0})
    saved = read_parameters(save_image(image, tmp_path / "p.png", image.info["parameters"]))
    assert saved["controlnet"] == SD2_CONTROLNET
    assert saved["control_image"] == image_record(layout)
    assert saved["control_image"]["width"] == 700
    assert saved["controlnet_conditioning_scale"] == 1.0


def test_the_memory_count_includes_the_controlnet(control_weights, cpipe):
    plain = SyncDiffusionPipeline.from_pretrained(control_weights, device="cpu")
    scheduler = plain.new_scheduler()
    scheduler.set_timesteps(2)
    for pipe in (plain, cpipe):
        embeddings = pipe.encode_prompt("x")

        def eps(x, t, control=None, pipe=pipe, embeddings=embeddings):
            from syncdiffusion.core.sampling import guided_eps

            return guided_eps(
                pipe.unet, x, t, control, text_embeddings=embeddings, guidance_scale=7.5
            )

        pipe.counts = [pipe.window_bytes(eps, scheduler, sync) for sync in (True, False)]
    assert all(c > p for c, p in zip(cpipe.counts, plain.counts, strict=True))


def test_a_controlnet_of_another_family_is_refused_naming_both_folders(control_weights):
    with pytest.raises(WeightsError) as refused:
        SyncDiffusionPipeline.from_pretrained(
            control_weights, device="cpu", model="tiny-sdxl", controlnet=SD2_CONTROLNET
        )
    message = str(refused.value)
    assert SD2_CONTROLNET in message and "tiny-sdxl" in message


def test_sdxl_with_its_controlnet(control_weights, layout):
    pipe = SyncDiffusionPipeline.from_pretrained(
        control_weights, device="cpu", model="tiny-sdxl", controlnet=SDXL_CONTROLNET
    )
    inputs = dict(prompt="x", width=384, height=256, num_inference_steps=1, sync_threshold=1)
    steered = pipe(control_image=layout, output_type="latent", **inputs)
    off = pipe(
        control_image=layout, controlnet_conditioning_scale=0.0, output_type="latent", **inputs
    )
    assert steered.shape == off.shape == (1, 4, 32, 48)
    assert (steered - off).abs().max() > 1e-3


def test_the_command_line_lays_a_photo_out_by_its_edges_and_remakes_it(control_weights, tmp_path):
    from test_cli import run_cli

    photo, other = tmp_path / "photo.jpg", tmp_path / "other.png"
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((256, 640, 3)) * 255).astype(np.uint8)).save(photo)
    Image.new("RGB", (640, 256)).save(other)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ("--weights", str(control_weights), "--controlnet", SD2_CONTROLNET)
    made = run_cli(
        "--prompt", "a harbour", "--control-image", str(photo), "--control-preprocess", "canny",
        "--num-inference-steps", "1", "--sync-threshold", "0", "--output", str(first), *common,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    saved = read_parameters(first)
    with Image.open(photo) as opened:
        assert (saved["width"], saved["height"]) == panorama_size(opened, Geometry())[:2]
    assert saved["control_preprocess"] == "canny" and saved["controlnet"] == SD2_CONTROLNET

    without = run_cli("--from-png", str(first), "--output", str(again), *common)
    assert without.returncode == 2
    assert "640x256" in without.stderr and "--control-image" in without.stderr
    another = run_cli(
        "--from-png", str(first), "--control-image", str(other), "--output", str(again), *common
    )
    assert another.returncode == 2
    assert "is not the condition image" in another.stderr and "Traceback" not in another.stderr
    remade = run_cli(
        "--from-png", str(first), "--control-image", str(photo), "--output", str(again), *common
    )
    assert remade.returncode == 0, remade.stderr
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


def test_a_controlnet_adds_its_passes_to_what_a_request_costs():
    request = panorama_request({"prompt": "x"})  # 2048x512: 13 windows, 50 steps, 5 synced
    extra = (13 * 50 + 3 * 5 * 12) * LIMIT.controlnet_pass
    assert request_cost(request, control=True) == pytest.approx(request_cost(request) + extra)
