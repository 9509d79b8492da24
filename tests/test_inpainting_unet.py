"""An inpainting UNet (9 input channels, as `stable-diffusion-2-inpainting`) on a tiny one:
diffusers' `StableDiffusionInpaintPipeline` on one window, each window's crops of the mask and
the masked image's latent in every network call, and a synced panorama around a photo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from syncdiffusion import SyncDiffusionPipeline, WeightsError
from syncdiffusion.core.init_image import (
    encode,
    image_pixels,
    mask_latent,
    mask_pixels,
    outpaint,
)
from syncdiffusion.core.windows import gather
from syncdiffusion.models.family import INPAINTING_CHANNELS
from syncdiffusion.models.tiny import TINY_MODELS, make_tiny_controlnet, make_tiny_weights
from syncdiffusion.models.weights import check_controlnet_fits
from tests.test_init_image import diffusers_pipeline, left_half_kept, max_difference, picture

MODEL, SIDE = TINY_MODELS["sd2-inpainting"][0], 256  # a 32-latent window


@pytest.fixture(scope="module")
def inpainting_weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("inpainting"), ("sd2-inpainting",))


@pytest.fixture(scope="module")
def inpainting(inpainting_weights) -> SyncDiffusionPipeline:
    return SyncDiffusionPipeline.from_pretrained(inpainting_weights, device="cpu", model=MODEL)


def test_the_unet_takes_the_mask_and_the_masked_image_beside_the_latent(inpainting):
    assert inpainting.unet.config.in_channels == INPAINTING_CHANNELS == 9
    assert inpainting.inpainting and inpainting.window_pixels == SIDE


def test_a_controlnet_for_the_plain_unet_is_refused_by_name(inpainting_weights, tiny_weights):
    controlnet = inpainting_weights / "controlnet" / "cn"
    make_tiny_controlnet(tiny_weights / "stable-diffusion-2-base", controlnet)
    with pytest.raises(WeightsError, match="in_channels is 4 in the ControlNet and 9 in the UNet"):
        check_controlnet_fits(inpainting_weights / MODEL, controlnet)


# What diffusers' pipeline is given for each of ours: an image in, a mask, the strength. Without
# a mask an inpainting UNet makes everything anew (a white mask); without an image too, over a
# grey picture (any picture under a white mask is 0 in [-1, 1]).
CASES = {
    "repaint from noise": (True, True, 1.0),
    "repaint from the image": (True, True, 0.7),
    "restyle, no mask": (True, False, 0.7),
    "from a prompt alone": (False, False, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_one_window_is_diffusers_inpainting_with_the_same_draws(inpainting, case):
    has_image, has_mask, strength = CASES[case]
    image, mask = picture(SIDE, SIDE, seed=1), left_half_kept(SIDE, SIDE)
    grey = Image.new("RGB", (SIDE, SIDE), (128, 128, 128))
    ours = inpainting(
        prompt="a bay",
        **({"image": image, "prompt_strength": strength} if has_image else {}),
        **({"mask": mask} if has_mask else {}),
        width=SIDE,
        height=SIDE,
        num_inference_steps=3,
        sync_weight=0,
        guidance_scale=7.5,
        seed=4,
    )
    theirs_pipe = diffusers_pipeline(StableDiffusionInpaintPipeline, inpainting)
    theirs = theirs_pipe(
        prompt="a bay",
        image=image if has_image else grey,
        mask_image=mask if has_mask else Image.new("L", (SIDE, SIDE), 255),
        strength=strength,
        num_inference_steps=3,
        guidance_scale=7.5,
        height=SIDE,
        width=SIDE,
        generator=torch.Generator("cpu").manual_seed(4),
    ).images[0]
    assert max_difference(ours, theirs) <= 2


def test_every_network_call_takes_its_windows_crops_across_the_seam(inpainting):
    """Three windows and the 360 panorama's wrap ones, two per call: each call's extra channels
    are its windows' crops of the mask and of the masked image's latent, in both guidance
    halves; the mask's channel is diffusers' mask at latent size, the rest the masked image's
    latent, drawn after the noise."""
    width, image, mask = 2 * SIDE, picture(2 * SIDE, SIDE, seed=5), left_half_kept(2 * SIDE, SIDE)
    inputs = dict(prompt="a bay", image=image, mask=mask, prompt_strength=1.0, seed=2)
    inputs |= dict(width=width, height=SIDE, stride=16, loop_closure=True, sync_weight=0)
    calls = []
    hook = inpainting.unet.register_forward_pre_hook(
        lambda _module, args: calls.append(args[0].detach().clone())
    )
    try:
        inpainting(num_inference_steps=1, view_batch_size=2, output_type="latent", **inputs)
    finally:
        hook.remove()
    windows = inpainting.geometry.windows({**inputs, "num_inference_steps": 1})
    assert any(w.wraps for w in windows)
    generator = torch.Generator().manual_seed(2)
    torch.randn((1, 4, SIDE // 8, width // 8), generator=generator)  # the noise, drawn first
    masked_image = image_pixels(image, width, SIDE) * (mask_pixels(mask, width, SIDE) < 0.5)
    with torch.no_grad():
        masked = encode(inpainting.vae, masked_image, generator)
    conditioning = torch.cat([mask_latent(mask, width, SIDE, 8), masked], dim=1)
    assert len(calls) == (len(windows) + 1) // 2
    for k, call in enumerate(calls):
        crops = gather(conditioning, windows[2 * k : 2 * k + 2])
        assert call.shape[1] == 9
        assert torch.equal(call[:, 4:5], torch.cat([crops[:, :1]] * 2))
        torch.testing.assert_close(call[:, 5:], torch.cat([crops[:, 1:]] * 2))


def test_a_synced_panorama_around_a_photo_syncs_to_it(inpainting):
    """A photo half a window wide in the middle of a panorama two windows wide (outpainting):
    synced, deterministic, and the sync step moves it."""
    photo, width = picture(SIDE // 2, SIDE, seed=3), 2 * SIDE
    inputs = dict(prompt="a coast", image=photo, width=width, height=SIDE, prompt_strength=1.0)
    inputs |= dict(num_inference_steps=2, sync_threshold=1, seed=7, stride=16)
    reported = []
    synced = inpainting(output_type="latent", callback=reported.append, **inputs)
    assert [state["sync"] for state in reported] == [True, False]
    assert synced.shape == (1, 4, SIDE // 8, width // 8) and synced.isfinite().all()
    assert torch.equal(synced, inpainting(output_type="latent", **inputs))
    plain = inpainting(output_type="latent", **{**inputs, "sync_weight": 0.0})
    assert not torch.equal(synced, plain)
    # Not held to the photo, as diffusers does not hold an inpainting UNet's: it is an input.
    canvas, _ = outpaint(photo, None, width, SIDE)
    image = inpainting(**inputs)
    assert image.size == (width, SIDE)
    assert image.info["parameters"]["image"]["width"] == SIDE // 2
    assert canvas.size == image.size
